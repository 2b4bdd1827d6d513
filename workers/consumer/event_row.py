"""An ``events`` row as the worker builds it: named fields, each with its column's SQL type.

A ``NamedTuple``, so a batch of rows is still a list of tuples for ``jsonrows`` (handed
over as plain tuples: orjson writes a tuple subclass as its repr) while the code that
builds and reads them names every field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from ingest.contract import clicks, referrers


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
    user_agent: str | None  # written NULL since schema 20: the text is agent_id's
    referrer: str | None
    country: str | None
    asn: int | None
    enrichment: dict[str, Any] | None  # what row_enrichment keeps of it (schema 16)
    visitor_key: str | None
    out_of_window: bool
    payload: dict[str, Any]  # what row_payload keeps of it (schemas 17 and 20)
    bot_counted: bool
    device_id: int | None  # its event_devices entry: set where enrichment is
    place_id: int | None  # its event_places entry: where the address told more than its country
    agent_id: int | None  # its event_agents entry: the User-Agent's text (schema 20)
    # (burst_clicks and burst_seconds, a click_burst flag on its row in schemas 18 to 22,
    # are no longer written: a flag is an event_flags row, made after the commit)


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
    "place_id": "integer",
    "agent_id": "integer",
}
COLUMNS: tuple[tuple[str, str], ...] = tuple((name, SQL_TYPES[name]) for name in EventRow._fields)


# of an enrichment's document, what the row keeps: what no column of the row holds nor an
# entry it names (``ip``, ``country``, ``asn`` and ``is_bot`` are columns, the device and the
# versions are the ``event_devices`` entry's, the AS name, city, region and coordinates the
# ``event_places`` entry's: schema 17; the referrer's domain where the ``referrer`` column
# gives it back: schema 26); event_enrichment() in schema.sql puts the document together again
def row_fields(
    bot_reason: str | None, referrer_domain: str | None, ip: str | None, referrer: str | None
) -> dict[str, Any] | None:
    """What the row stores of an enrichment's document with these fields (``enrich.Found``'s),
    beside its ``referrer``; None for nothing. The bot reason where there is one; the
    referrer's domain only where Postgres would not derive the same from ``referrer``
    (``ingest.contract.referrers``), a null included. An IPv6 address is kept as the worker
    wrote it: Postgres writes some (``::1.2.3.4``) otherwise than Python does, and the
    document must read back as it was; an IPv4 address reads back the same from the ``ip``
    column."""
    out: dict[str, Any] = {}
    if bot_reason is not None:
        out["bot_reason"] = bot_reason
    if referrer_domain != referrers.derived(referrer):
        out["referrer_domain"] = referrer_domain
    if ip is not None and ":" in ip:
        out["ip"] = ip
    return out or None


def row_payload(
    payload: dict[str, Any], code: str, *, click: UUID | None = None, visitor: str | None = None
) -> dict[str, Any]:
    """What the row stores of an event's ``payload`` (schema 17): without its ``code``, the
    code of the row's link, nor a ``referrer`` of text, the row's ``referrer`` column; and
    for a click (schema 20; ``click`` and ``visitor``: its row's ``click_id`` and
    ``visitor_id``) without a ``click_id`` that is the one its column mints back to, nor a
    ``visitor_id`` its column holds. event_payload() in schema.sql puts them back; a row
    without a ``code`` is of this form."""
    if payload.get("code") != code:  # never so (the link was found by it): kept whole, read as it is
        return payload
    # the minted click id only where the payload has one to compare (a click's own id is minted
    # back from its column: most clicks carry none)
    minted = clicks.mint(click) if click is not None and "click_id" in payload else None
    return {
        k: v
        for k, v in payload.items()
        if k != "code"
        and (k != "referrer" or not isinstance(v, str))
        and (k != "click_id" or v != minted or minted is None)
        and (k != "visitor_id" or v != visitor or visitor is None)
    }


def plain(rows: list[EventRow]) -> list[tuple[Any, ...]]:
    """The rows as plain tuples, in column order, for ``jsonrows.doc``."""
    return [tuple(r) for r in rows]
