"""An erased person met again, after their erasure (``ingest.privacy.erasure`` erases).

``follow``: in a worker's batch, the rows of the visitor and click that an erased person's
late lead names (``erasure.learn`` put them in the ledger) are scrubbed at once. ``recheck``:
the sweep's look at Postgres, behind the ledger's fence, for rows a batch stored beside the
one that taught the ledger (``workers.ops.erasure``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.contract import clicks as erasure_clicks
from ingest.contract import copies, erasure
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.events import Envelope, EventType
from ingest.privacy.erasure import scrub_rows, uuid_floor


async def follow(conn: asyncpg.Connection, key: bytes, originals: list[tuple[Envelope, str | None]]) -> None:
    """In a worker's batch, once ``erasure.learn`` took in what an erased person's late lead
    names: the rows of its visitor and click scrubbed as the erasure would have. (A batch
    beside this one may store that click before this commits: the sweep's ``recheck``,
    behind its fence, finds it.)"""
    for e, ws in originals:
        x = e.payload.get("external_id")
        v = e.payload.get("visitor_id")
        c = erasure_clicks.parse(cl) if isinstance(cl := e.payload.get("click_id"), str) else None
        visitors = [v] if isinstance(v, str) and not erasure.is_pseudonym(v) else []
        clicks = [c] if c is not None else []
        if c is not None and ws is not None:  # the row that holds its key, where it is a copy (ingest.contract.copies)
            clicks += (await copies.stored_as(conn, ws, int(EventType.CLICK), clicks)).values()
        if ws is None or not (visitors or clicks):
            continue
        external = x if isinstance(x, str) and not erasure.is_pseudonym(x) else None
        # a visitor or a click another customer holds too is theirs as well: left to them
        held_v, held_c = await erasure.held_by_others(conn, key, ws, external, visitors, clicks)
        visitors = [v for v in visitors if v not in held_v]
        clicks = [k for k in clicks if k not in held_c]
        since = min([datetime.fromtimestamp(e.received_at_ms / 1000, UTC), *(_uuid_time(k) for k in clicks)])
        await scrub_rows(conn, key, ws, external, visitors, clicks, since, shared_visitors=sorted(held_v))


async def recheck(pool: asyncpg.Pool, key: bytes, workspace_id: str, since: datetime) -> int:
    """The sweep's look at one workspace's rows in Postgres: behind the ledger's fence, each
    event row of ``workspace_id`` from a month before ``since`` whose visitor, click or
    customer that workspace's ledger names and that still holds personal data is scrubbed
    (a row a batch stored beside the one that taught the ledger its visitor or click).
    Another workspace's rows are never read: its visitor of the same id is someone else
    (docs/privacy.md). Read a page at a time by ``events_workspace_id``. The rows scrubbed."""
    after = uuid.UUID(int=max(uuid_floor(since - timedelta(days=31)).int - 1, 0))  # pages: event_id > after
    scrubbed = 0
    async with pool.acquire() as conn:
        async with conn.transaction():  # the fence: batches that read the ledger before have committed
            await conn.execute("SELECT pg_advisory_xact_lock($1)", erasure.LOCK)
        while True:
            chunk = await conn.fetch(_RAW, workspace_id, after, _CHUNK)
            if not chunk:
                break
            after = chunk[-1]["event_id"]
            probes: dict[bytes, list[asyncpg.Record]] = {}
            for r in chunk:
                for d in _row_digests(key, r, workspace_id):
                    probes.setdefault(d, []).append(r)
            found = await conn.fetch(_NAMED, list(probes), workspace_id)
            hit = {r["event_id"]: r for d in found for r in probes[bytes(d["digest"])]}
            for r in sorted(hit.values(), key=lambda r: r["event_id"]):
                x = r["customer_external_id"]
                external = x if isinstance(x, str) and not erasure.is_pseudonym(x) else None
                visitors = [v] if isinstance(v := r["visitor_id"], str) and not erasure.is_pseudonym(v) else []
                clicks = [c for c in (r["click_id"], r["event_id"] if r["type"] == EventType.CLICK else None) if c]
                # what another customer holds too (their browser) is left to them
                held_v, held_c = await erasure.held_by_others(conn, key, workspace_id, external, visitors, clicks)
                visitors = [v for v in visitors if v not in held_v]
                clicks = [c for c in clicks if c not in held_c or c == r["event_id"]]
                async with conn.transaction():
                    # what the raw row teaches (its visitor, the click a lead names), as a
                    # writer meeting it would have learned: their copies in Redis and the
                    # archive are the sweep's to find too
                    await erasure.learn(conn, key, [(_as_met(r, external, workspace_id), workspace_id)], met=False)
                    await scrub_rows(
                        conn, key, workspace_id, external, visitors, clicks, since, shared_visitors=sorted(held_v)
                    )
                scrubbed += 1
            if len(chunk) < _CHUNK:
                break
    return scrubbed


# one workspace's rows that may still hold personal data (an erased person's scrubbed ones
# hold none of these), a page at a time in event id order: an index range of
# events_workspace_id (workspace_id, event_id) in each partition from the floor on
_RAW = """
SELECT event_id, type, visitor_id, click_id, customer_external_id FROM events
WHERE workspace_id = $1 AND event_id > $2
  AND (ip IS NOT NULL OR user_agent IS NOT NULL OR agent_id IS NOT NULL OR referrer IS NOT NULL
    OR (visitor_id IS NOT NULL AND visitor_id NOT LIKE 'erased-%')
    OR (customer_external_id IS NOT NULL AND customer_external_id NOT LIKE 'erased-%'))
ORDER BY event_id
LIMIT $3
"""
_NAMED = "SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2"
_CHUNK = 5000


def _row_digests(key: bytes, r: asyncpg.Record, workspace_id: str) -> list[bytes]:
    """The digests that name a row (as ``Ledger.names`` names its event): a row that names a
    customer is theirs, named by their id alone."""
    if isinstance(x := r["customer_external_id"], str) and not erasure.is_pseudonym(x):
        return [erasure.digest(key, EXTERNAL, x, workspace_id)]
    out = [erasure.digest(key, EVENT, r["event_id"].hex)]
    if r["click_id"] is not None:
        out.append(erasure.digest(key, EVENT, r["click_id"].hex))
    if isinstance(v := r["visitor_id"], str):
        out.append(erasure.digest(key, VISITOR, v))
    if isinstance(x := r["customer_external_id"], str):
        out.append(erasure.digest(key, EXTERNAL, x, workspace_id))
    return out


def _as_met(r: asyncpg.Record, external: str | None, workspace_id: str) -> Envelope:
    """An event row as the envelope a writer would have met: its ids, nothing else."""
    payload: dict[str, object] = {}
    if isinstance(v := r["visitor_id"], str) and not erasure.is_pseudonym(v):
        payload["visitor_id"] = v
    if r["click_id"] is not None:
        payload["click_id"] = erasure_clicks.mint(r["click_id"])
    if external is not None:
        payload["external_id"] = external
    at_ms = r["event_id"].int >> 80
    return Envelope(EventType(r["type"]), "", payload, workspace_id, event_id=r["event_id"], received_at_ms=at_ms)


def _uuid_time(u: uuid.UUID) -> datetime:
    return datetime.fromtimestamp((u.int >> 80) / 1000, UTC)
