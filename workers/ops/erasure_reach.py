"""What the pending erasures reach, for their sweep (``workers.ops.erasure``): a sweep's
counts (``SweepResult``), which envelopes the ledger names (``Check``), and per workspace
the ledger's entries and the people's stored events (``theirs``), from which the sweep
derives the names of what it must reach in Redis (``workers.ops.erasure_redis``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from ingest.contract import clicks, erasure, erasure_index, fence
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.events import Envelope, sale_routing_key
from ingest.contract.keys import Keys
from ingest.privacy import erasure as pg_erasure


@dataclass(slots=True)
class SweepResult:
    erasures: int = 0  # pending when the sweep began
    rows_rechecked: int = 0  # event rows of theirs that still held personal data, scrubbed now
    entries_deleted: int = 0  # stream entries read and acked by every group: deleted
    # stream entries a group has yet to read or ack, and a partition's unread entries (below): next sweep
    entries_waiting: int = 0
    # partitions whose workers have yet to read what was appended before an erasure: the
    # person's entries may be among them (next sweep, once their rows say where)
    entries_unread: int = 0
    letters_replaced: int = 0
    answers_rewritten: int = 0
    fingerprints_deleted: int = 0
    clicks_uncached: int = 0  # click cache entries of the person's clicks met in the streams
    segments_read: int = 0
    segments_rewritten: int = 0
    redis_done: list[str] = field(default_factory=list)
    archive_done: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Check:
    """Which envelopes the ledger names and that still hold personal data: a page at a time."""

    def __init__(self, pg: asyncpg.Pool, key: bytes) -> None:
        self.pg = pg
        self.key = key

    async def personal(self, envelopes: list[Envelope]) -> set[int]:
        """Indexes of ``envelopes`` to scrub."""
        if not envelopes:
            return set()
        async with self.pg.acquire() as conn:
            ledger = await erasure.Ledger.read(conn, envelopes)
            hits = {
                i
                for i, e in enumerate(envelopes)
                if ledger.names(e) and erasure.scrub(self.key, e, ledger.workspace(e)) != e
            }
            # a workspace this shard holds no more (moved away, or arriving by a move): its
            # copies are its own shard's sweep's, whose ledger is the one that learns
            away = await _not_here(conn, {w for i in hits if (w := ledger.workspace(envelopes[i])) is not None})
            while True:
                hits = {i for i in hits if ledger.workspace(envelopes[i]) not in away}
                # what a copy the sweep scrubs teaches (a dead-lettered or archived lead's
                # click): the ledger learns it as a worker storing it would have, and the
                # erasure is pending again where something joined
                try:
                    met = [(envelopes[i], ledger.workspace(envelopes[i])) for i in sorted(hits)]
                    await erasure.learn(conn, self.key, met, met=False)
                    return hits
                except fence.Moved as exc:  # one moved away meanwhile: left to its new shard
                    if not set(exc.workspaces) - away:
                        raise
                    away |= set(exc.workspaces)

    def scrub(self, e: Envelope) -> Envelope:
        return erasure.scrub(self.key, e)


async def _not_here(conn: asyncpg.Connection, workspaces: set[str]) -> set[str]:
    """Which of ``workspaces`` this shard does not hold now (``fence.FENCE_NOT_HERE``)."""
    if not workspaces:
        return set()
    return {str(r["id"]) for r in await conn.fetch(fence.FENCE_NOT_HERE, sorted(workspaces))}


@dataclass(slots=True)
class Event:
    """One of a person's stored events: where its entry and its idempotency record may be."""

    event_id: uuid.UUID
    hint: int | None  # the partition its routing key gives under the current count (None: not known)
    dedupe: str | None  # its idempotency key's digest, from its payload (a record an older edge did not file)

    @property
    def ms(self) -> int:
        return erasure_index.event_ms(self.event_id)


@dataclass(slots=True)
class Theirs:
    """What the pending erasures of one workspace reach: their ledger's entries (kind ->
    digests) and their people's stored events (found under the pseudonyms those make)."""

    workspace_id: str
    digests: dict[str, list[bytes]]
    events: list[Event]
    # their clicks the ledger names (never one another customer's events name too): each
    # click cache entry's name, deleted by every sweep, not only by the erasure's request
    cached: list[str] = field(default_factory=list)


# an erasure's own entries, in its own workspace
_LEDGER_OF = """
SELECT i.digest, i.kind FROM erased_ids i JOIN erasures e ON e.id = i.erasure_id AND i.workspace_id = e.workspace_id
WHERE e.id = ANY($1::uuid[])
"""
# the person's events, by index (events_workspace_customer, events_workspace_visitor_known,
# the key): their rows name them by the pseudonyms their ledger's digests make
_THEIR_EVENTS = """
SELECT e.event_id, e.click_id, l.code, e.payload->>'dedupe' AS dedupe
FROM events e LEFT JOIN links l ON l.id = e.link_id
WHERE e.workspace_id = $1 AND e.event_id >= $4 AND e.event_id = ANY(ARRAY(
    SELECT event_id FROM events WHERE workspace_id = $1 AND customer_external_id = ANY($2::text[]) AND event_id >= $4
    UNION SELECT event_id FROM events WHERE workspace_id = $1 AND visitor_id = ANY($3::text[]) AND event_id >= $4
))
"""
_THEIR_CLICKS = """
SELECT e.event_id, e.click_id, l.code, e.payload->>'dedupe' AS dedupe
FROM events e LEFT JOIN links l ON l.id = e.link_id
WHERE e.event_id = ANY($2::uuid[]) AND e.workspace_id = $1
"""
_THEIR_SALES = """
SELECT event_id, invoice_id FROM sales WHERE workspace_id = $1 AND customer_external_id = ANY($2::text[])
"""


async def theirs(pg: asyncpg.Pool, key: bytes, keys: Keys, rows: list[asyncpg.Record]) -> list[Theirs]:
    """Per workspace, what its pending erasures reach (``Theirs``)."""
    spaces: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        spaces.setdefault(str(r["workspace_id"]), []).append(r)
    out = []
    async with pg.acquire() as conn:
        for ws, mine in sorted(spaces.items()):
            digests: dict[str, list[bytes]] = {}
            for d in await conn.fetch(_LEDGER_OF, [r["id"] for r in mine]):
                digests.setdefault(d["kind"], []).append(bytes(d["digest"]))
            since = [r["since"] for r in mine if r["since"] is not None]
            floor = pg_erasure.uuid_floor(min(since) - timedelta(days=31)) if since else uuid.UUID(int=0)
            aliases = {kind: [erasure.pseudonym_of(key, d) for d in ds] for kind, ds in digests.items()}
            found = await conn.fetch(_THEIR_EVENTS, ws, aliases.get(EXTERNAL, []), aliases.get(VISITOR, []), floor)
            named = {r["click_id"] for r in found if r["click_id"] is not None} - {r["event_id"] for r in found}
            if named:
                found = [*found, *await conn.fetch(_THEIR_CLICKS, ws, sorted(named))]
            events = {r["event_id"]: event_of(keys, r["event_id"], r["code"], r["dedupe"]) for r in found}
            for r in await conn.fetch(_THEIR_SALES, ws, aliases.get(EXTERNAL, [])):
                routing = sale_routing_key(ws, "invoice", r["invoice_id"]) if r["invoice_id"] else None
                events.setdefault(r["event_id"], event_of(keys, r["event_id"], routing, None))
            named_clicks = set(digests.get(EVENT, []))
            seen = {c for r in found for c in (r["event_id"], r["click_id"]) if c is not None}
            cached = sorted(clicks.mint(c) for c in seen if erasure.digest(key, EVENT, c.hex) in named_clicks)
            out.append(Theirs(ws, digests, [events[k] for k in sorted(events)], cached))
    return out


def event_of(keys: Keys, event_id: uuid.UUID, routing: str | None, dedupe: str | None) -> Event:
    digest = dedupe.split(":")[1] if isinstance(dedupe, str) and dedupe.startswith("idem:") else None
    return Event(event_id, keys.partition_for(routing) if routing else None, digest)
