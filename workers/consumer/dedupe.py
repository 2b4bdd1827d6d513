"""A batch's dedupe keys: claimed in ``event_dedupe`` before its events are inserted
(``workers.consumer.store``'s lock order), and what a lost claim makes of its event.

A lead's or conversion's dedupe key (one lead per customer and event name, one conversion
per code and referred session) is claimed first, in key order; only the events whose key
came back (or that have none) are inserted, in event-id order. A key lives in
event_dedupe, not in a unique index on events: an index on the partitioned table would
have to hold the partition key, and a key must outlive its event's partition.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.events import Envelope, EventType
from workers.consumer import drops, key_copies
from workers.consumer.event_row import EventRow
from workers.consumer.stored import Stored

_CLAIM_KEYS = f"""
INSERT INTO event_dedupe (workspace_id, type, dedupe_key, event_id, received_at)
{jsonrows.select(("uuid", "smallint", "text", "uuid", "timestamptz"))}
ORDER BY 1, 2, 3, 4  -- the lowest event id takes a key repeated within the batch
ON CONFLICT DO NOTHING
RETURNING event_id
"""
# Why the claim comes first. An insert waits when another open transaction holds the same
# key: a dedupe key in event_dedupe, or an event id in events. Keys are all claimed
# (statement one, ``claim``) before any event row is inserted (statement two, the store's
# ``_INSERT_EVENTS``), each statement in one global order, so a wait in statement one is on
# a batch in statement one or later, holding keys only behind ours in that order or no
# longer waiting on keys at all; and a wait in statement two is on an event id: an event
# with a key is inserted only by the batch that claimed its key (the same id always carries
# the same key), so that wait is on a copy without a key, at its place in event-id order.
# None is circular. (Advisory locks per key would also do, but cost a round trip and a
# lock-table entry per key: a 10,000-event batch is more than the default table holds.)


def _opt(v: object) -> str | None:
    return v if isinstance(v, str) else None


def dedupe_key(e: Envelope) -> str | None:
    """The event's dedupe key (None: it has none)."""
    if e.type is EventType.LEAD and isinstance(e.payload.get("external_id"), str):
        return f"lead\x1f{e.payload['external_id']}\x1f{e.payload.get('name') or ''}"
    # a conversion per (code, session); a click spooled under an idempotency key per key
    # (the edge could not check the key without Redis: ingest/edge/idempotency.py)
    return _opt(e.payload.get("dedupe"))


async def claim(conn: asyncpg.Connection, batch: list[EventRow]) -> tuple[list[EventRow], list[UUID]]:
    """Claim the batch's dedupe keys; the event rows to insert come back: those without a
    key, and those whose key this batch now holds (in event-id order still); and the ids of
    the events whose key was held already (by another event, or by their own earlier copy)."""
    keyed = [r for r in batch if r.dedupe_key is not None]
    if not keyed:
        return batch, []
    claims = [(r.workspace_id, r.type, r.dedupe_key, r.event_id, r.received_at) for r in keyed]
    claimed = {r["event_id"] for r in await conn.fetch(_CLAIM_KEYS, jsonrows.doc(claims))}
    keep = [r for r in batch if r.dedupe_key is None or r.event_id in claimed]
    lost = [r.event_id for r in keyed if r.event_id not in claimed]
    return keep, lost


async def settle_lost(
    conn: asyncpg.Connection, claiming: list[EventRow], lost: list[UUID], kept: dict[UUID, Stored]
) -> list[drops.NoRow]:
    """After the batch's events are inserted: of the events that lost their key's claim
    (``lost``, of the rows ``claiming`` claimed for), the duplicates' drops (``duplicates``);
    and each filed as a copy of the stored one (``key_copies.file``)."""
    no_row = await duplicates(conn, [kept[event_id] for event_id in lost])
    if lost:  # an answer may name a keyed copy that lost its key: filed as a copy of the stored one
        gone = set(lost)
        await key_copies.file(
            conn,
            [
                (r.workspace_id, r.type, r.dedupe_key, r.event_id)
                for r in claiming
                if r.event_id in gone and r.dedupe_key
            ],
        )
    return no_row


# of the events whose dedupe key was held already, those it is held by another event for
_HELD_BY_ANOTHER = f"""
SELECT x.event_id
FROM {jsonrows.table(("uuid", "smallint", "text", "uuid"), "x(workspace_id, type, dedupe_key, event_id)")}
JOIN event_dedupe d USING (workspace_id, type, dedupe_key)
WHERE d.event_id <> x.event_id
"""


async def duplicates(conn: asyncpg.Connection, lost: list[Stored]) -> list[drops.NoRow]:
    """Of the leads and conversions that lost their dedupe key's claim, those whose key
    another event holds (a second lead of one customer and name, a second conversion of
    one code and session): duplicates. A key held by the event's own id is a copy of an
    event stored already (a redelivery, a replay): not a drop; nor is a click's key (an
    idempotency key's, the client's own retry)."""
    keyed = [s for s in lost if s.type in (EventType.LEAD, EventType.CONVERSION)]
    if not keyed:
        return []
    found = await conn.fetch(
        _HELD_BY_ANOTHER,
        jsonrows.doc([(s.link.workspace_id, int(s.type), dedupe_key(s.envelope), s.envelope.event_id) for s in keyed]),
    )
    others = {r["event_id"] for r in found}
    return [
        drops.NoRow(s.envelope.event_id, s.link.workspace_id, s.link.id, "duplicate", s.at)
        for s in keyed
        if s.envelope.event_id in others
    ]
