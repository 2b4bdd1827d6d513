"""Part (c): the edge against the naive synchronous design (``apps.py`` ``naive``: one UPDATE
per click, committed before the answer), first with Postgres on this machine, then with
Postgres behind a latency proxy the bench runs (``proxy.py``, 0.5 ms each way, so at least
1 ms per round trip: a managed database in the next zone), as production has it.

Through the proxy, every process that talks to Postgres goes through the same proxy: the
naive app's pool, the edge's ``DATABASE_URL`` and the workers'. Measured there, interleaved
in each run:

- ``c1ms``: the naive app as the local phase runs it (asyncpg's pool as shipped: the UPDATE,
  then the pool's reset query on release, two round trips per click);
- ``c1ms_1rt``: the same app without the reset query (one round trip per click);
- ``c1ms_50``: that one again, its clicks spread over the 50 links as (b) spreads the edge's,
  so that no row lock serialises them;
- ``c1ms_edge``: the edge on seed 000, as (b) runs it, its Postgres through the proxy;
- ``c1ms_half``: the fastest naive variant and the edge under the same open-loop load (the
  bench's own generator, half what the slowest variant sustained): p50 and p99 at equal
  traffic, where wrk's closed loop compares the queues of two saturated servers;
- ``c1ms_e2e``: the edge and the workers (``--workers``) through the proxy under wrk's full
  load: what the edge accepted and what the workers committed meanwhile.

The goals take the edge against the fastest of the three naive variants, in each run.

The naive app keeps a pool of 10 connections (asyncpg's default) under wrk's 32 connections.
On one hot link, each UPDATE waits for the row lock, held until the previous commit's WAL
flush: that, not the pool or the network, bounds it (a pool of 32 was no faster when tried).
On 50 links nothing serialises them: the pool caps it at 10 per round trip (about 7,700/s
through this proxy), more than one naive process reaches on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis.exceptions import ResponseError

from ingest.contract.keys import Keys
from refstream.embedded import free_port

from . import openloop
from . import requests as reqs
from .context import Ctx
from .procs import Proc
from .world import backlog, copy_database, delete_keys, warm
from .wrk import Request, proc_cpu_seconds

DELAY_MS = 0.5  # each way
NAIVES = ("c1ms", "c1ms_1rt", "c1ms_50")  # the naive variants measured through the proxy


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (user, password and database kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(user + "@" if user else "") + f"127.0.0.1:{port}"))


def _upstream(url: str) -> str:
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname.startswith("/"):
        raise RuntimeError("part c's latency proxy needs Postgres over TCP (a host and port in DATABASE_URL)")
    return f"{parts.hostname}:{parts.port or 5432}"


async def _round_trip_ms(url: str, n: int = 200) -> float:
    """Median of ``SELECT 1`` round trips on one connection."""
    conn = await asyncpg.connect(url)
    try:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.fetchval("SELECT 1")
            times.append(time.perf_counter() - t0)
    finally:
        await conn.close()
    return statistics.median(times) * 1000


async def _start_proxy(ctx: Ctx) -> tuple[Proc, int]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.proxy",
        "--port",
        str(port),
        "--upstream",
        _upstream(ctx.world.server_url),
        "--delay-ms",
        str(DELAY_MS),
    ]
    proxy = ctx.procs.start("proxy", argv)
    deadline = time.monotonic() + 30
    while True:
        if not proxy.alive():
            raise RuntimeError(f"the latency proxy exited: {ctx.procs.tail('proxy')}")
        try:
            conn = await asyncpg.connect(through(ctx.world.url(), port), timeout=2)
        except (TimeoutError, OSError) as exc:
            if time.monotonic() > deadline:
                why = f"the latency proxy passed no connection within 30 s ({exc}): {ctx.procs.tail('proxy')}"
                raise RuntimeError(why) from None
            await asyncio.sleep(0.05)
            continue
        await conn.close()
        return proxy, port


class _CpuOf:
    """Cores a process used from construction to ``ctx.note`` (warm-up included)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.cpu0, self.t0 = pid, proc_cpu_seconds(pid), time.monotonic()

    def note(self, ctx: Ctx, name: str) -> None:
        ctx.note(name, (proc_cpu_seconds(self.pid) - self.cpu0) / (time.monotonic() - self.t0))


async def part_c(ctx: Ctx) -> None:
    """(c) the naive design on one hot link, locally then through the latency proxy; the edge
    and the whole pipeline through the same proxy."""
    hot = ctx.world.codes[0]
    requests = [r for r in reqs.seed_000(ctx.world) if r.path.endswith("/" + hot)]
    await _naive(ctx, "c", ctx.world.url(), requests)
    if "b000.rps" in ctx.figures:
        ctx.note("c.tput_ratio", ctx.figures["b000.rps"] / ctx.figures["c.rps"])
        ctx.note("c.p99_ratio", ctx.figures["b000.p99_ms"] / ctx.figures["c.p99_ms"])

    proxy, port = await _start_proxy(ctx)
    try:
        ctx.note("c1ms.rtt_direct_ms", await _round_trip_ms(ctx.world.url()))
        ctx.note("c1ms.rtt_ms", await _round_trip_ms(through(ctx.world.url(), port)))
        dsn = through(ctx.world.url(), port)
        variants = {
            "c1ms": (requests, ()),
            "c1ms_1rt": (requests, ("--no-reset",)),
            "c1ms_50": (reqs.seed_000(ctx.world), ("--no-reset",)),
        }
        for name, (load, args) in variants.items():
            cpu = _CpuOf(proxy.pid)
            await _naive(ctx, name, dsn, load, *args)
            cpu.note(ctx, f"{name}.proxy_cpu")
        # the same open-loop load for the fastest naive and the edge: half what every variant sustained
        fastest = max(NAIVES, key=lambda n: ctx.figures[f"{n}.rps"])
        rate = min(ctx.figures[f"{n}.rps"] for n in NAIVES) / 2
        ctx.note("c1ms_half.rate", rate)
        load, args = variants[fastest]
        await _naive(ctx, None, dsn, load, *args, half=rate)
        await _edge(ctx, port, rate)
        for naive in NAIVES:
            ctx.note(f"{naive}.tput_ratio", ctx.figures["c1ms_edge.rps"] / ctx.figures[f"{naive}.rps"])
            ctx.note(f"{naive}.p99_ratio", ctx.figures["c1ms_edge.p99_ms"] / ctx.figures[f"{naive}.p99_ms"])
        ctx.note("c1ms_edge.tput_ratio", ctx.figures[f"{fastest}.tput_ratio"])
        ctx.note("c1ms_edge.p99_ratio", ctx.figures[f"{fastest}.p99_ratio"])
        ctx.note("c1ms_half.p99_ratio", ctx.figures["c1ms_half.edge_p99_ms"] / ctx.figures["c1ms_half.naive_p99_ms"])
        await _end_to_end(ctx, proxy, port)
    finally:
        proxy.stop()


async def _naive(
    ctx: Ctx, name: str | None, dsn: str, requests: list[Request], *args: str, half: float | None = None
) -> None:
    """wrk's closed loop against the naive app (figures under ``name``), or with ``half``,
    the open loop at that rate (figures under ``c1ms_half.naive_*``)."""
    naive = ctx.procs.app("naive", "--dsn", dsn, *args)
    try:
        if name is not None:
            await ctx.wrk(name, naive.base_url, requests, connections=ctx.opts.connections, server_pid=naive.pid)
        if half is not None:
            await _open_loop(ctx, "naive", naive.base_url, requests, half)
    finally:
        naive.stop()


async def _edge(ctx: Ctx, port: int, half: float) -> None:
    """(c1ms_edge) the edge as (b 000) runs it, its Postgres through the proxy: the open loop
    at ``half`` requests/s, then wrk's closed loop."""
    keys = ctx.keys("c1ms")
    await warm(ctx.world, ctx.redis, keys)
    edge = ctx.procs.edge(DATABASE_URL=through(ctx.world.url(), port), REFSTREAM_STREAM_PREFIX=keys.prefix)
    try:
        # the open loop first, as the naive app meets it: on a fresh process
        await _open_loop(ctx, "edge", edge.base_url, reqs.seed_000(ctx.world), half)
        await ctx.wrk(
            "c1ms_edge", edge.base_url, reqs.seed_000(ctx.world), connections=ctx.opts.connections, server_pid=edge.pid
        )
    finally:
        edge.stop()
        await delete_keys(ctx.redis, keys.prefix)


async def _open_loop(ctx: Ctx, who: str, base_url: str, requests: list[Request], rate: float) -> None:
    """Warm-up and measurement at ``rate``; p50/p99 of the answers to requests sent after the warm-up."""
    latencies: list[tuple[float, float]] = []
    sent = await openloop.run(
        base_url, requests, rate=rate, seconds=ctx.opts.warmup + ctx.opts.duration, latencies=latencies
    )
    measured = sorted(lat for at, lat in latencies if at >= ctx.opts.warmup)
    if not measured:
        raise RuntimeError(f"part c: no answer from the {who} at {rate:.0f} requests/s")
    ctx.note(f"c1ms_half.{who}_p50_ms", measured[len(measured) // 2] * 1000)
    ctx.note(f"c1ms_half.{who}_p99_ms", measured[min(len(measured) - 1, int(len(measured) * 0.99))] * 1000)
    ctx.note(f"c1ms_half.{who}_failed", sent.failed)


async def _end_to_end(ctx: Ctx, proxy: Proc, port: int) -> None:
    """(c1ms_e2e) edge and workers through the proxy, into a fresh copy of the database."""
    keys = ctx.keys("c1ms_e2e")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_c1ms")
    await warm(ctx.world, ctx.redis, keys, database=db)
    env = {"DATABASE_URL": through(ctx.world.url(db), port), "REFSTREAM_STREAM_PREFIX": keys.prefix}
    edge = ctx.procs.edge(**env)
    workers = [
        ctx.procs.refstream(f"worker{i}", "work", REFSTREAM_CONSUMER_NAME=f"bench-{ctx.run}-c{i}", **env)
        for i in range(ctx.opts.workers)
    ]
    conn = await asyncpg.connect(ctx.world.url(db))  # the bench's own count: not through the proxy
    marks: list[tuple[int, float]] = []

    async def count() -> None:
        marks.append((await conn.fetchval("SELECT count(*) FROM events"), time.monotonic()))

    try:
        await _until_groups(ctx, keys)
        cpu = _CpuOf(proxy.pid)
        await ctx.wrk(
            "c1ms_e2e",
            edge.base_url,
            reqs.seed_000(ctx.world),
            connections=ctx.opts.connections,
            server_pid=edge.pid,
            on_start=count,
        )
        await count()
        cpu.note(ctx, "c1ms_e2e.proxy_cpu")
        left, _ = await backlog(ctx.redis, keys)
        (n0, t0), (n1, t1) = marks
        accepted, committed = ctx.figures["c1ms_e2e.rps"], (n1 - n0) / (t1 - t0)
        ctx.note("c1ms_e2e.committed_per_s", committed)
        ctx.note("c1ms_e2e.committed_ratio", committed / accepted)
        ctx.note("c1ms_e2e.backlog_left", left)
        ctx.note("c1ms_e2e.ratio_edge", min(accepted, committed) / ctx.figures["c1ms_edge.rps"])
        faster = max(ctx.figures[f"{n}.rps"] for n in NAIVES)
        ctx.note("c1ms_e2e.ratio_naive", min(accepted, committed) / faster)
    finally:
        await conn.close()
        edge.stop()
        for w in workers:
            w.stop()
        await delete_keys(ctx.redis, keys.prefix)


async def _until_groups(ctx: Ctx, keys: Keys, limit_s: float = 60) -> None:
    """Until the workers read every partition: their group has a consumer there (the edge
    makes the group too)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if all([any(g["consumers"] for g in await ctx.redis.xinfo_groups(s)) for s in keys.streams]):
                return
        except ResponseError:  # no such stream yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers made no consumer group within {limit_s:.0f} s")
        await asyncio.sleep(0.1)
