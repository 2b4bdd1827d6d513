"""Customers: one per (workspace, visitor), upserted from a batch's new events.

Every field follows one rule that does not depend on how events are grouped into batches
or in which order the batches commit. Events are ordered by (received time, event id):
first touch (link, affiliate, program) is the earliest event, the first click the earliest
click (click ids are UUIDv7s: their order is time order), each contact field the latest
event that carried a value for it. Status only rises (1 click < 2 lead < 3 converted),
first/last seen use LEAST/GREATEST. The row keeps the time and id of the event behind each
of those fields, so a later batch compares against that event, not against the batch
that happened to write it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.events import EventType
from workers.consumer.stored import Stored

# column -> the payload key that carries it
_CONTACT = {"external_id": "external_id", "email": "email", "name": "customer_name", "avatar_url": "avatar"}


def _latest(column: str) -> str:
    # a NULL comparison (a row written before the per-field times existed) lets the event win
    newer = (
        f"EXCLUDED.{column} IS NOT NULL AND ((EXCLUDED.{column}_at, EXCLUDED.{column}_event)"
        f" > (c.{column}_at, c.{column}_event)) IS NOT FALSE"
    )
    return ",\n    ".join(
        f"{col} = CASE WHEN {newer} THEN EXCLUDED.{col} ELSE c.{col} END"
        for col in (column, f"{column}_at", f"{column}_event")
    )


_SET_CONTACT = ",\n    ".join(_latest(column) for column in _CONTACT)

# the stored first touch stands on a tie it cannot rank (an older row without first_event_id)
_EARLIER = "(EXCLUDED.first_seen_at, EXCLUDED.first_event_id) < (c.first_seen_at, c.first_event_id)"

# a row: the key, the first touch, status and seen times, then each contact field with its time and event
_CUSTOMER_ROWS = jsonrows.select(
    ("uuid", "text", "uuid", "uuid", "uuid", "uuid", "uuid", "smallint", "timestamptz", "timestamptz")
    + ("text", "timestamptz", "uuid") * len(_CONTACT)
)
_UPSERT = f"""
INSERT INTO customers AS c (workspace_id, visitor_id, link_id, affiliate_id, program_id, first_event_id,
                            first_click_id, status, first_seen_at, last_seen_at,
                            external_id, external_id_at, external_id_event, email, email_at, email_event,
                            name, name_at, name_event, avatar_url, avatar_url_at, avatar_url_event)
{_CUSTOMER_ROWS}
ORDER BY 1, 2
ON CONFLICT (workspace_id, visitor_id) DO UPDATE SET
    link_id = CASE WHEN {_EARLIER} THEN EXCLUDED.link_id ELSE c.link_id END,
    affiliate_id = CASE WHEN {_EARLIER} THEN EXCLUDED.affiliate_id ELSE c.affiliate_id END,
    program_id = CASE WHEN {_EARLIER} THEN EXCLUDED.program_id ELSE c.program_id END,
    first_event_id = CASE WHEN {_EARLIER} THEN EXCLUDED.first_event_id ELSE c.first_event_id END,
    first_click_id = LEAST(c.first_click_id, EXCLUDED.first_click_id),
    status = GREATEST(c.status, EXCLUDED.status),
    first_seen_at = LEAST(c.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(c.last_seen_at, EXCLUDED.last_seen_at),
    {_SET_CONTACT}
"""


def _order(s: Stored) -> tuple[datetime, UUID]:
    return s.at, s.envelope.event_id


@dataclass(slots=True)
class _Merged:
    """A batch's events of one customer, reduced by the same rules the upsert applies."""

    first: Stored
    last_at: datetime
    status: int = 0
    first_click: UUID | None = None
    contact: dict[str, tuple[str, Stored]] = field(default_factory=dict)  # column -> (value, its event)

    def add(self, s: Stored) -> None:
        if _order(s) < _order(self.first):
            self.first = s
        self.last_at = max(self.last_at, s.at)
        self.status = max(self.status, int(s.type))
        if s.type is EventType.CLICK and (self.first_click is None or s.envelope.event_id < self.first_click):
            self.first_click = s.envelope.event_id
        for column, key in _CONTACT.items():
            if (value := s.text(key)) is not None:
                held = self.contact.get(column)
                if held is None or _order(s) > _order(held[1]):
                    self.contact[column] = (value, s)


def makes_one(s: Stored) -> bool:
    """Whether ``s`` (counted) makes or moves a customer: an event with a visitor, a bot's click aside."""
    return s.text("visitor_id") is not None and not (s.is_bot and s.type is EventType.CLICK)


async def upsert(conn: asyncpg.Connection, events: list[Stored]) -> None:
    """The batch is merged per (workspace, visitor) first: one INSERT may not touch a row twice.
    Events without a visitor (seed 000 clicks) and bot clicks make no customer."""
    merged: dict[tuple[str, str], _Merged] = {}
    for s in events:
        if not makes_one(s):
            continue
        visitor = s.text("visitor_id")
        assert visitor is not None
        if (m := merged.get((s.link.workspace_id, visitor))) is None:
            m = merged[(s.link.workspace_id, visitor)] = _Merged(s, s.at)
        m.add(s)
    if not merged:
        return
    batch: list[tuple[Any, ...]] = []
    for key in sorted(merged):
        m = merged[key]
        contact: list[Any] = []
        for column in _CONTACT:
            held = m.contact.get(column)
            contact += (held[0], held[1].at, held[1].envelope.event_id) if held else (None, None, None)
        first = m.first
        batch.append(
            (
                *key,
                first.link.id,
                first.link.affiliate_id,
                first.link.program_id,
                first.envelope.event_id,
                m.first_click,
                m.status,
                first.at,
                m.last_at,
                *contact,
            )
        )
    await conn.execute(_UPSERT, jsonrows.doc(batch))
