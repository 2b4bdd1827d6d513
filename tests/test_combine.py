"""Small batches of several partitions go in one transaction (workers/consumer/combine.py),
against a real Redis and Postgres: each event stored and counted once, a poison entry among
joined batches still dead-lettered alone, and a batch from the backlog never joined.

A transaction is told by ``processed_at`` (``now()``, the transaction's start). The first
batch's transaction is held on a row lock taken by the test, so the others are known to
come while it is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.wire import FIELD
from workers.consumer.enrich import Enricher, Found
from workers.consumer.pipeline import Batch, Entry, Pipeline

from .conftest import wait_for

CODE = "PARTNER123"
ODD = "an odd agent"


def _click(ua: str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0") -> Envelope:
    return Envelope(type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": CODE}, user_agent=ua)


async def _batch(redis: Any, keys: Keys, p: int, envelopes: list[Envelope], *, tracked: bool = False) -> Batch:
    stream = keys.stream(p)
    entries: list[Entry] = [
        (await redis.xadd(stream, {FIELD: wire.to_blob(e)}), {FIELD: wire.to_blob(e)}) for e in envelopes
    ]
    return Batch(p, stream, entries, tracked=tracked)


class _OddAgent(Enricher):
    """The worker's own code failing for one User-Agent only: that entry is poison."""

    def enrich_row(
        self, ip: str | None, user_agent: str | None, referrer: str | None, ip_policy: str = "full"
    ) -> Found:
        if user_agent == ODD:
            raise TypeError("a bug")
        return super().enrich_row(ip, user_agent, referrer, ip_policy)


@pytest.fixture
async def held(pg: asyncpg.Pool, world: Any) -> AsyncIterator[asyncio.Event]:
    """The link's row locked until the event is set: a batch that counts a click on it waits."""
    release = asyncio.Event()
    locked = asyncio.Event()

    async def hold() -> None:
        async with pg.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM links WHERE code = $1 FOR UPDATE", CODE)
            locked.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await locked.wait()
    try:
        yield release
    finally:
        release.set()
        await task


async def _waiting_on_lock(pg: asyncpg.Pool) -> bool:
    return bool(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def _behind_a_held_first(
    pipeline: Pipeline, pg: asyncpg.Pool, held: asyncio.Event, first: Batch, later: list[Batch]
) -> None:
    """``first`` stored while the link's lock is held, ``later`` brought while it waits; the
    lock released once all of them are queued behind it; then every batch settled."""
    running = [asyncio.create_task(pipeline.process(first))]
    await wait_for(lambda: _waiting_on_lock(pg), what="the first batch waiting on the link's lock")
    running += [asyncio.create_task(pipeline.process(b)) for b in later]

    async def queued() -> bool:
        return len(pipeline.combiner._queue) == len(later)

    await wait_for(queued, what="the later batches queued behind the first")
    held.set()
    await asyncio.gather(*running)


async def test_small_batches_that_come_while_one_is_stored_share_the_next_transaction(
    settings, redis, pg: asyncpg.Pool, keys: Keys, held: asyncio.Event
):
    pipeline = Pipeline(settings, redis, pg)
    first = await _batch(redis, keys, 0, [_click() for _ in range(2)])
    later = [await _batch(redis, keys, p, [_click() for _ in range(p)]) for p in (1, 2, 3)]
    await _behind_a_held_first(pipeline, pg, held, first, later)

    rows = await pg.fetch("SELECT processed_at, count(*) AS n FROM events GROUP BY 1 ORDER BY 1")
    assert [r["n"] for r in rows] == [2, 1 + 2 + 3]  # two transactions: the first, then the three together
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = $1", CODE) == 8
    assert first.result is not None and (first.result.inserted, first.result.joined) == (2, False)
    results = [b.result for b in later]
    assert [(r.inserted, r.joined) for r in results if r] == [(6, False), (0, True), (0, True)]
    assert pipeline.totals.inserted == 8 and pipeline.totals.batches == 4
    assert await redis.xlen(keys.dead) == 0


async def test_a_poison_entry_among_joined_batches_is_dead_lettered_alone(
    settings, redis, pg: asyncpg.Pool, keys: Keys, held: asyncio.Event
):
    pipeline = Pipeline(settings, redis, pg, _OddAgent())
    first = await _batch(redis, keys, 0, [_click()])
    odd = _click(ODD)
    later = [
        await _batch(redis, keys, 1, [_click(), _click()]),
        await _batch(redis, keys, 2, [_click(), odd, _click()]),
        await _batch(redis, keys, 3, [_click()]),
    ]
    await _behind_a_held_first(pipeline, pg, held, first, later)

    (dead,) = await redis.xrange(keys.dead)
    assert dead[1][b"error"].startswith(b"store: TypeError") and dead[1][FIELD] == wire.to_blob(odd)
    stored = {r["event_id"] for r in await pg.fetch("SELECT event_id FROM events")}
    good = [e.event_id for b in (first, *later) for e in (b.good or []) if e.event_id != odd.event_id]
    assert stored == set(good) and len(good) == 6  # every other event once, the odd one nowhere
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = $1", CODE) == 6
    assert pipeline.totals.inserted == 6 and pipeline.totals.dead == 1


async def test_a_batch_from_the_backlog_is_stored_alone(
    settings, redis, pg: asyncpg.Pool, keys: Keys, held: asyncio.Event
):
    pipeline = Pipeline(settings, redis, pg)
    first = await _batch(redis, keys, 0, [_click()])
    running = [asyncio.create_task(pipeline.process(first))]
    await wait_for(lambda: _waiting_on_lock(pg), what="the first batch waiting on the link's lock")
    tracked = await _batch(redis, keys, 1, [_click(), _click()], tracked=True)
    fresh = await _batch(redis, keys, 2, [_click(), _click(), _click()])
    running += [asyncio.create_task(pipeline.process(b)) for b in (tracked, fresh)]

    async def both_waiting() -> bool:  # the tracked batch on the lock itself, the fresh one queued
        n = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return n == 2 and len(pipeline.combiner._queue) == 1

    await wait_for(both_waiting, what="the tracked batch in a transaction of its own, the fresh one queued")
    held.set()
    await asyncio.gather(*running)
    rows = await pg.fetch("SELECT processed_at, count(*) AS n FROM events GROUP BY 1")
    assert sorted(r["n"] for r in rows) == [1, 2, 3]
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = $1", CODE) == 6


async def test_from_idle_a_small_batch_waits_for_the_other_partitions_then_no_longer(pg: asyncpg.Pool, world: Any):
    """The first small batch after idle waits (here up to a minute) until one has come from
    each partition read (three here), and not a moment past the third: all three in one
    transaction, long before the minute."""
    from workers.consumer import store
    from workers.consumer.combine import Combiner

    combiner = Combiner(lambda envelopes: store.write_batch(pg, envelopes), 500, gather_s=60.0)
    combiner.expect = lambda: 3
    first = asyncio.create_task(combiner.store([_click()]))

    async def gathering() -> bool:  # the flusher is waiting for more (it cleared the arrival flag)
        return combiner._flusher is not None and not combiner._arrived.is_set() and not first.done()

    await wait_for(gathering, what="the first batch waiting for the others")
    rest = [asyncio.create_task(combiner.store([_click(), _click()])) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)
    assert [(r.inserted, r.joined) for r in results if r] == [(5, False), (0, True), (0, True)]
    assert await pg.fetchval("SELECT count(DISTINCT processed_at) FROM events") == 1
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = $1", CODE) == 5


async def test_a_flusher_cancelled_mid_write_leaves_no_caller_waiting():
    """The worker stopping cancels the shared write's task: each batch in it hears so
    (cancelled, as its reader is), none waits for ever on a result that cannot come."""
    from workers.consumer.combine import Combiner

    writing, never = asyncio.Event(), asyncio.Event()

    async def write(envelopes: list[Envelope]) -> Any:
        writing.set()
        await never.wait()

    combiner = Combiner(write, 500)
    asked = [asyncio.create_task(combiner.store([_click()])) for _ in range(2)]
    await asyncio.wait_for(writing.wait(), timeout=30)
    assert combiner._flusher is not None
    combiner._flusher.cancel()
    done, _ = await asyncio.wait(asked, timeout=30)
    assert done == set(asked) and all(t.cancelled() for t in asked)
