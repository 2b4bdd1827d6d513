"""Where a replay's pages are stored: one pool, or, with several shards
(``ingest.ledger.placement``), each event on the shard its workspace is on, as the
consumer's batches are. A page is written on each shard in a transaction of its own, one
after the other; one that fails fails the page, and a replay run again finds what the
others committed by their dedupe (it stores nothing twice). On a shard of several, the
page's workspaces' fence is taken (``store.write_batch``'s ``fence``): an event of a
workspace that moved away is never written on its old copy (``placement.Moved``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg

from ingest.contract.connections import Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.ledger.placement import DEFAULT, Placement
from ingest.privacy import erasure_copy
from workers.consumer import erased, store
from workers.consumer.enrich import Enricher

Target: TypeAlias = asyncpg.Pool | Placement

# of a page's ids, those stored already: events, sales and refunds (a refund's copy's id is the refund's)
STORED = """
SELECT (SELECT count(*) FROM events WHERE event_id = ANY($1::uuid[]))
     + (SELECT count(*) FROM sales WHERE event_id = ANY($1::uuid[]))
     + (SELECT count(*) FROM refunds WHERE id = ANY($1::uuid[]))
"""


class Within:
    """A pool whose one connection is inside the dry run's transaction: ``write_batch``'s own
    transaction becomes a savepoint, and everything is rolled back at the end."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self.conn


async def _sharded(target: Target) -> Placement | None:
    """The placement, when there are several shards to route among; else None."""
    if not isinstance(target, Placement):
        return None
    await target.fresh()
    return target if len(target.names) > 1 else None


def _pool(target: Target) -> asyncpg.Pool:
    return target.directory if isinstance(target, Placement) else target


async def parts(
    target: Target, envelopes: list[Envelope], pool_of: Callable[[str], Awaitable[Any]] | None = None
) -> list[tuple[Any, list[Envelope], list[str]]]:
    """The page by shard: (that shard's pool, its events, the workspaces to fence). An event
    that names only its code (its edge could not resolve the link) is placed, and fenced, as
    the workers place it: by the directory's claim of the code (``Placement.workspaces_of``),
    never sent to ``default`` unfenced, where a move's arriving copy may be."""
    placed = await _sharded(target)
    if placed is None:
        return [(await pool_of(DEFAULT) if pool_of is not None else _pool(target), envelopes, [])]
    for e, ws in zip(envelopes, await placed.workspaces_of(envelopes), strict=True):
        e.workspace_id = ws
    found = []
    for name, part in (await placed.split(envelopes, lambda e: e.workspace_id)).items():
        pool = await (pool_of or placed.pool_of)(name)
        found.append((pool, part, sorted({e.workspace_id for e in part if e.workspace_id})))
    return found


async def write(
    target: Target,
    envelopes: list[Envelope],
    enricher: Enricher | None,
    pool_of: Callable[[str], Awaitable[Any]] | None = None,
) -> store.BatchResult:
    """``store.write_batch`` of the page on each shard its workspaces are on."""
    total = store.BatchResult()
    for pool, part, fence in await parts(target, envelopes, pool_of):
        r = await store.write_batch(pool, part, enricher, fence=fence)
        total.inserted += r.inserted
        total.duplicates += r.duplicates
        total.unknown_codes += r.unknown_codes
        total.inactive_codes += r.inactive_codes
        total.refunds_not_restored += r.refunds_not_restored
    return total


async def restore_erasures(target: Target, redis: Redis, keys: Keys) -> None:
    """The erasures a restore of Postgres lost, back from their copy before anything is
    stored, each on its workspace's shard (``ingest.privacy.erasure_copy``)."""
    placed = await _sharded(target)
    if placed is None:
        await erasure_copy.restore(_pool(target), redis, keys)
        return
    if failed := await erased.restore_ledger(placed, redis, keys):
        raise next(iter(failed.values()))  # a replay stores nothing before every shard's is back


class DryRun:
    """The dry run's transactions: one per shard a partition's pages touch, opened on first
    use, all rolled back at the partition's end (``rollback``)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._held: dict[str, tuple[Any, Within, asyncpg.transaction.Transaction]] = {}

    async def pool_of(self, name: str) -> Within:
        if name not in self._held:
            placed = await _sharded(self.target)
            pool = await placed.pool_of(name) if placed is not None else _pool(self.target)
            acquired = pool.acquire()
            conn = await acquired.__aenter__()
            tx = conn.transaction()
            await tx.start()
            self._held[name] = (acquired, Within(conn), tx)
        return self._held[name][1]

    async def stored(self, envelopes: list[Envelope]) -> int:
        """How many of the page's ids are stored already, on their shards."""
        n = 0
        for within, part, _ in await parts(self.target, envelopes, self.pool_of):
            n += await within.conn.fetchval(STORED, [e.event_id for e in part])
        return n

    async def write(self, envelopes: list[Envelope], enricher: Enricher | None) -> store.BatchResult:
        return await write(self.target, envelopes, enricher, self.pool_of)

    async def rollback(self) -> None:
        held, self._held = self._held, {}
        for acquired, _, tx in held.values():
            try:
                await tx.rollback()
            finally:
                await acquired.__aexit__(None, None, None)
