"""An ``events`` row as the worker builds it: named fields, each with its column's SQL type.

A ``NamedTuple``: the code that builds and reads the rows names every field, and a batch
goes to Postgres as one array per column (``columns``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import orjson


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
    enrichment: dict[str, Any] | None  # what row_enrichment keeps of it (schema 16)
    visitor_key: str | None
    out_of_window: bool
    payload: dict[str, Any]
    bot_counted: bool
    device_id: int | None  # its event_devices entry: set where enrichment is


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
    "device_id": "integer",
}
COLUMNS: tuple[tuple[str, str], ...] = tuple((name, SQL_TYPES[name]) for name in EventRow._fields)


# of an enrichment's document, what the row keeps: what its address and referrer told and
# no column of the row holds (``ip``, ``country``, ``asn`` and ``is_bot`` are columns, the
# device and the versions are the ``event_devices`` entry's); event_enrichment() in
# schema.sql puts the document together again
ROW_FIELDS = ("as_name", "city", "region", "latitude", "longitude", "bot_reason", "referrer_domain")


def row_enrichment(doc: dict[str, Any]) -> dict[str, Any] | None:
    """What the row stores of ``doc``: ``ROW_FIELDS`` that are not null (a null one is
    read as null), None for none. An IPv6 address is kept as the worker wrote it: Postgres
    writes some (``::1.2.3.4``) otherwise than Python does, and the document must read back
    as it was; an IPv4 address reads back the same from the ``ip`` column."""
    out = {k: v for k in ROW_FIELDS if (v := doc[k]) is not None}
    if (ip := doc["ip"]) is not None and ":" in ip:
        out["ip"] = ip
    return out or None


# ``$n::type[]`` for each column, in order; a jsonb column goes as text (orjson's, as
# ``jsonrows`` wrote it), so no connection's codec is involved: ``$n::text[]::jsonb[]``
ARRAY_PARAMS: tuple[str, ...] = tuple(
    f"${i}::text[]::jsonb[]" if t == "jsonb" else f"${i}::{t}[]" for i, (_, t) in enumerate(COLUMNS, 1)
)
_JSONB: tuple[int, ...] = tuple(i for i, (_, t) in enumerate(COLUMNS) if t == "jsonb")


def _json(v: dict[str, Any] | None) -> str | None:
    return None if v is None else orjson.dumps(v, default=str).decode()


def columns(rows: list[EventRow]) -> list[list[Any]]:
    """The rows as one list per column, in column order: ``ARRAY_PARAMS``' arguments."""
    out = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]
    for i in _JSONB:
        out[i] = [_json(v) for v in out[i]]
    return out
