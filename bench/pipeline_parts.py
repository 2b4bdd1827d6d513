"""Parts (d), (e) and (f): the workers against Postgres's own ceiling, the whole pipeline
end to end, and the drain of a backlog left by stopped workers. Each part writes into a
fresh copy of the world's database and its own key prefix."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import asyncpg

from ingest.contract import wire
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.consumer.store import write_batch
from workers.host.worker import settle_heap

from . import openloop
from . import requests as reqs
from .context import Ctx
from .procs import Proc
from .world import backlog, copy_database, fill, mixed, warm
from .wrk import Request


async def _until(what: str, check: Callable[[], Awaitable[bool]], limit_s: float, every: float = 0.02) -> float:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit_s:.0f} s")
        await asyncio.sleep(every)
    return time.monotonic()


async def _drained(ctx: Ctx, keys: Keys, limit_s: float = 300) -> float:
    async def empty() -> bool:
        return (await backlog(ctx.redis, keys))[0] == 0

    return await _until("the workers to drain the streams", empty, limit_s, every=0.1)


async def part_d(ctx: Ctx) -> None:
    """(d) ``refstream work --drain`` on N pre-filled mixed events, against write_batch
    called directly (no Redis, no enrichment) on the same envelopes and batch size."""
    n = ctx.opts.drain_events
    envelopes = mixed(ctx.world, n, random.Random(ctx.run))
    keys = ctx.keys("d")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_d")
    await fill(ctx.redis, keys, envelopes)
    worker = ctx.procs.refstream(
        "worker-drain", "work", "--drain", DATABASE_URL=ctx.world.url(db), REFSTREAM_STREAM_PREFIX=keys.prefix
    )
    spies = ctx.profile("worker", worker.pid, None)

    async def started() -> bool:
        return (await backlog(ctx.redis, keys))[1] > 0

    t0 = await _until("the worker to read", started, 120)
    t1 = await _drained(ctx, keys, limit_s=600)
    if worker.wait(120) != 0:
        raise RuntimeError(f"work --drain failed: {ctx.procs.tail('worker-drain')}")
    for spy in spies:
        await asyncio.to_thread(spy.wait, 60)
    ctx.note("d.events", n)
    ctx.note("d.worker_events_per_s", n / (t1 - t0))
    ctx.rss("worker", worker)

    # the ceiling: the same transactions from this process, one writer per partition, as the worker has
    ceiling_db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_dc")
    decoded = [wire.from_blob(wire.to_blob(e)) for e in envelopes]
    parts: list[list[Envelope]] = [[] for _ in range(ctx.opts.partitions)]
    for e in decoded:
        parts[keys.partition_for(e.payload["code"])].append(e)
    settings = Settings(database_url=ctx.world.url(ceiling_db))
    pool = await create_pg_pool(settings)
    size = ctx.opts.batch_size

    async def writer(items: list[Envelope]) -> None:
        for i in range(0, len(items), size):
            await write_batch(pool, items[i : i + size], None)

    try:
        with _settled_heap(size):
            start = time.monotonic()
            await asyncio.gather(*(writer(p) for p in parts))
            ceiling = n / (time.monotonic() - start)
    finally:
        await pool.close()
    ctx.note("d.ceiling_events_per_s", ceiling)
    ctx.note("d.ratio", ctx.figures["d.worker_events_per_s"] / ceiling)


@contextmanager
def _settled_heap(batch_size: int) -> Iterator[None]:
    """The collector as the worker process runs it (``settle_heap``: what was built before
    is frozen, the youngest generation sized to a batch), for the ceiling in this process
    (whose heap holds the bench's own envelopes), then put back."""
    threshold = gc.get_threshold()
    settle_heap(batch_size)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


_LATENCY = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)) AS p99
FROM events WHERE received_at >= to_timestamp($1) AND received_at < to_timestamp($2)
"""


async def part_e_f(ctx: Ctx) -> None:
    """(e) sustained events/s with everything on the box, and accept→commit latency at half
    that load; (f) the drain of the backlog the workers leave when stopped under load."""
    keys = ctx.keys("e")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_e")
    await warm(ctx.world, ctx.redis, keys, database=db)
    env = {"DATABASE_URL": ctx.world.url(db), "REFSTREAM_STREAM_PREFIX": keys.prefix}
    edge = ctx.procs.edge(**env)
    conn = await asyncpg.connect(ctx.world.url(db))

    def start_workers() -> list[Proc]:
        return [
            ctx.procs.refstream(f"worker{i}", "work", REFSTREAM_CONSUMER_NAME=f"bench-{ctx.run}-{i}", **env)
            for i in range(ctx.opts.workers)
        ]

    workers = start_workers()
    requests = reqs.seed_000(ctx.world)
    try:
        await _until("the workers to start", _all_groups(ctx, keys), 60, every=0.2)
        # full load, closed loop: what the edge accepts and what the workers commit meanwhile
        o = ctx.opts
        mark: list[tuple[int, float]] = []

        async def count() -> None:
            mark.append((await conn.fetchval("SELECT count(*) FROM events"), time.monotonic()))

        await ctx.wrk("e_full", edge.base_url, requests, connections=o.connections, server_pid=edge.pid, on_start=count)
        await count()
        (n0, t0), (n1, t1) = mark
        accepted, committed = ctx.figures["e_full.rps"], (n1 - n0) / (t1 - t0)
        sustained = min(accepted, committed)
        ctx.note("e.accepted_per_s", accepted)
        ctx.note("e.committed_per_s", committed)
        ctx.note("e.sustained_per_s", sustained)
        if "b000.rps" in ctx.figures:
            ctx.note("e.ratio_edge", sustained / ctx.figures["b000.rps"])
        await _drained(ctx, keys)

        # half load, open loop; latency from the rows received after the warm-up
        rate = sustained / 2
        start = time.time()
        sent = await openloop.run(edge.base_url, requests, rate=rate, seconds=o.warmup + o.duration)
        await _drained(ctx, keys)
        row = await conn.fetchrow(_LATENCY, start + o.warmup, start + o.warmup + o.duration)
        ctx.note("e.half_rate_per_s", sent.rate)
        ctx.note("e.half_failed", sent.failed)
        ctx.note("e.latency_events", row["n"])
        ctx.note("e.p50_ms", (row["p50"] or 0) * 1000)
        ctx.note("e.p99_ms", (row["p99"] or 0) * 1000)
        ctx.rss("edge", edge)
        for w in workers:
            ctx.rss("worker", w)
        if ctx.wants("f"):
            await _part_f(ctx, keys, edge.base_url, requests, rate, start_workers)
    finally:
        await conn.close()
        ctx.rss("edge", edge)
        edge.stop()
        for w in ctx.procs.running:
            if w.name.startswith("worker") and w.alive():
                w.stop()
                ctx.rss("worker", w)


def _all_groups(ctx: Ctx, keys: Keys) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for s in keys.streams:
            try:
                if not any(g["consumers"] for g in await ctx.redis.xinfo_groups(s)):  # a worker reads it
                    return False
            except Exception:
                return False
        return True

    return check


async def _part_f(
    ctx: Ctx, keys: Keys, base_url: str, requests: list[Request], rate: float, start_workers: Callable[[], list[Proc]]
) -> None:
    for w in [p for p in ctx.procs.running if p.name.startswith("worker")]:
        w.stop()
        ctx.rss("worker", w)
    from .edge_parts import stream_bytes

    bytes0, len0 = await stream_bytes(ctx, keys)
    stop = asyncio.Event()
    load = asyncio.create_task(openloop.run(base_url, requests, rate=rate, seconds=86400, stop=stop))
    try:
        await asyncio.sleep(ctx.opts.backlog_seconds)
        pending, _ = await backlog(ctx.redis, keys)
        bytes1, len1 = await stream_bytes(ctx, keys)
        if len1 > len0:
            ctx.note("g.redis_bytes_per_event_f", (bytes1 - bytes0) / (len1 - len0))
        t0 = time.monotonic()
        workers = start_workers()

        async def caught_up() -> bool:
            return (await backlog(ctx.redis, keys))[0] <= max(rate, 1.0)  # within a second's worth

        t1 = await _until("the workers to catch up", caught_up, 900, every=0.1)
    finally:
        stop.set()
        sent = await load
    drain_rate = (pending + rate * (t1 - t0)) / (t1 - t0)
    ctx.note("f.backlog", pending)
    ctx.note("f.ingest_per_s", sent.rate)
    ctx.note("f.catch_up_s", t1 - t0)
    ctx.note("f.drain_per_s", drain_rate)
    ctx.note("f.multiple", drain_rate / rate)
    await _drained(ctx, keys)
    for w in workers:
        ctx.rss("worker", w)
