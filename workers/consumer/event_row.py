"""An ``events`` row as the worker builds it: named fields, each with its column's SQL type.

A ``NamedTuple``, so a batch of rows is still a list of tuples for ``jsonrows`` (handed
over as plain tuples: orjson writes a tuple subclass as its repr) while the code that
builds and reads them names every field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID


class EventRow(NamedTuple):
    event_id: UUID
    type: int
    workspace_id: str
    link_id: str
    program_id: str | None
    affiliate_id: str | None
    click_id: UUID | None
    visitor_id: str | None
    customer_external_id: str | None
    name: str | None
    dedupe_key: str | None
    dialect: str
    test_mode: bool
    is_bot: bool
    received_at: datetime
    ip: str | None
    user_agent: str | None
    referrer: str | None
    country: str | None
    asn: int | None
    enrichment: dict[str, Any] | None
    visitor_key: str | None
    out_of_window: bool
    payload: dict[str, Any]
    bot_counted: bool


SQL_TYPES = {
    "event_id": "uuid",
    "type": "smallint",
    "workspace_id": "uuid",
    "link_id": "uuid",
    "program_id": "uuid",
    "affiliate_id": "uuid",
    "click_id": "uuid",
    "visitor_id": "text",
    "customer_external_id": "text",
    "name": "text",
    "dedupe_key": "text",
    "dialect": "text",
    "test_mode": "boolean",
    "is_bot": "boolean",
    "received_at": "timestamptz",
    "ip": "inet",
    "user_agent": "text",
    "referrer": "text",
    "country": "text",
    "asn": "integer",
    "enrichment": "jsonb",
    "visitor_key": "text",
    "out_of_window": "boolean",
    "payload": "jsonb",
    "bot_counted": "boolean",
}
COLUMNS: tuple[tuple[str, str], ...] = tuple((name, SQL_TYPES[name]) for name in EventRow._fields)


def plain(rows: list[EventRow]) -> list[tuple[Any, ...]]:
    """The rows as plain tuples, in column order, for ``jsonrows.doc``."""
    return [tuple(r) for r in rows]
