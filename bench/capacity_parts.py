"""Part (cap), not in the default set: capacity, measured. The CPU each kind of process
spends per event over a steady run of the whole pipeline (the edge, the workers, Redis,
Postgres), and the throughput of 1 and 2 edge processes and of 1 and 2 workers, each
ratio against the one-process figure of the same run. ``docs/capacity.md`` turns the
figures into cores and nodes.

Redis is a server of the part's own (``redis-server`` from PATH, as the local one is
configured: no RDB, no AOF), a child of the bench, so its CPU is the pipeline's alone; a
shared Redis serves other clients too. Where no ``redis-server`` is on PATH the part uses
the bench's Redis and says so (``cap.redis_own`` 0): its CPU then counts everyone's work.

In order, each run, all on seed 000 (a bio.re click: the route of (b 000) and (e)):

- ``cap_edge1``, ``cap_edge2``: the edge alone (no worker yet), ``serve`` at
  ``REFSTREAM_PROCESSES`` 1 and then 2, under wrk's full load, each into its own prefix:
  accepted/s, and 2 / 1.
- ``cap_w1``, ``cap_w2``: the workers alone (the edges idle) on the backlog those two
  phases left: 1 ``refstream work`` on the first, 2 on the second; stored/s from the moment
  every worker has read from every partition until a tenth of that backlog is left (so
  neither start-up nor the tail is in it), and 2 / 1.
- ``cap_idle``: the first edge and the single worker with no load for ``--duration``: the
  cores each kind spends doing nothing (timers, blocking reads), a cost per process.
- ``cap_full``: the same two under wrk's full load (warm-up first, its events drained
  before the window opens).
- ``cap``: the steady run: the same two at half of what ``cap_full`` sustained (the lower
  of accepted/s and stored/s), open loop (the bench's own generator), warm-up, drain, then
  the measured window.

A measured window (``cap_full``, ``cap``) opens with nothing pending and closes once
everything accepted in it is stored and acked, so all the work its events caused is
inside it. ``bench.cap_meter`` reads the CPU of each kind of process over it, and what the
database grew by (its docstring says how).

- ``cap_hello``, between ``cap_idle`` and ``cap_full``: bare aiohttp (``bench.apps
  hello``, one process) under the same wrk at full load, its CPU from
  ``/proc/<pid>/stat`` over the measured wrk run: ``cap_hello.us_per_request``. Every
  per-event CPU figure of ``cap_full`` and ``cap`` (each kind, ``pg_bg`` and ``total``,
  per accepted and per stored) is noted in µs (``<kind>_us_per_<event>``) and in
  hello-worlds (``<kind>_hw_per_<event>``: µs ÷ that figure), in which the machine's
  speed cancels out.

With ``--profile DIR`` the steady window is also profiled, tier by tier, each tier's top
ten written to ``DIR`` as text (``bench.cap_profile``): py-spy on the edge and the
worker, ``INFO commandstats`` of the part's own Redis (reset as the window opens),
``pg_stat_statements`` where the server loads it, and ``EXPLAIN (ANALYZE, BUFFERS)`` of
one worker batch's statements after the window.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ingest.contract.connections import Redis, connect_redis
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from refstream.embedded import free_port

from . import cap_profile, openloop
from . import requests as reqs
from .cap_meter import KINDS, Meter, note_window
from .context import Ctx
from .pipeline_parts import _until
from .procs import Proc
from .world import backlog, copy_database, warm
from .wrk import Request, WrkResult, proc_cpu_seconds


async def _drained(redis: Redis, keys: Keys, limit_s: float = 600) -> float:
    async def empty() -> bool:
        return (await backlog(redis, keys))[0] == 0

    return await _until("the workers to drain the streams", empty, limit_s, every=0.05)


def _accepted(r: WrkResult) -> int:
    return max(0, r.requests - r.errors)


async def _redis_server(ctx: Ctx) -> tuple[str, Proc] | None:
    """A Redis of the part's own (redis-server from PATH, as the local one runs: no RDB, no
    AOF), started as a child of the bench; None when there is no redis-server."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    tmp = ctx.procs.logdir / f"cap-redis-{port}"
    tmp.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    proc = ctx.procs.start("cap-redis", argv)
    url = f"redis://127.0.0.1:{port}/0"
    client = connect_redis(Settings(redis_url=url))

    async def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"redis-server exited with {proc.popen.returncode}: {ctx.procs.tail('cap-redis')}")
        try:
            return bool(await client.ping())
        except (OSError, RedisConnectionError):
            return False

    try:
        await _until("the part's redis-server to answer", up, 30)
    finally:
        await client.aclose()
    return url, proc


def _joined(redis: Redis, keys: Keys, names: list[str]) -> Callable[[], Awaitable[bool]]:
    """True once every named consumer has read from every partition."""

    async def check() -> bool:
        for stream in keys.streams:
            try:
                consumers = await redis.xinfo_consumers(stream, GROUP)
            except ResponseError:  # no group yet
                return False
            have = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers}
            if not set(names) <= have:
                return False
        return True

    return check


async def _drain_rate(ctx: Ctx, name: str, redis: Redis, keys: Keys, workers: list[Proc], names: list[str]) -> float:
    """Stored (acked) per second from the moment every worker has read from every partition
    until a tenth of the backlog left then remains (from the workers' start instead, when
    the first to join had drained it before the last joined: a small backlog, a loaded
    machine)."""
    start_left, start_t = (await backlog(redis, keys))[0], time.monotonic()
    if start_left == 0:  # a rate over nothing is no figure: say what the phase before left
        raise RuntimeError(f"{name}: no backlog to drain in {keys.prefix} (figures so far: {ctx.figures})")
    await _until(f"{name}: the workers to read", _joined(redis, keys, names), 120, every=0.02)
    left0, t0 = (await backlog(redis, keys))[0], time.monotonic()
    if left0 <= start_left // 10:
        left0, t0 = start_left, start_t
    target = left0 // 10
    left1 = left0

    async def low() -> bool:
        nonlocal left1
        left1 = (await backlog(redis, keys))[0]
        return left1 <= target

    t1 = await _until(f"{name}: the workers to drain", low, 900, every=0.02)
    rate = (left0 - left1) / (t1 - t0) if t1 > t0 else 0.0
    ctx.note(f"{name}.workers", len(workers))
    ctx.note(f"{name}.measured_events", left0 - left1)
    ctx.note(f"{name}.stored_per_s", rate)
    await _drained(redis, keys)
    return rate


async def _spool(edge: Proc) -> tuple[float, float]:
    """(events the edge accepted into its local spool, events waiting there), from its
    /metrics (summed over a prefork edge's processes)."""
    async with aiohttp.ClientSession() as http, http.get(f"{edge.base_url}/metrics") as r:
        text = await r.text()
    spooled = waiting = 0.0
    seen = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "refstream_events_accepted_total" and s.labels.get("to") == "spool":
                spooled += s.value
            elif s.name == "refstream_spool_entries":
                waiting, seen = waiting + s.value, True
    if not seen:
        raise RuntimeError(f"{edge.base_url}/metrics has no refstream_spool_entries")
    return spooled, waiting


async def _edge_phase(ctx: Ctx, name: str, edge: Proc, requests: list[Request]) -> float:
    """wrk at the edge; then every event it spooled (Redis slow to answer on a loaded
    machine) replayed into Redis, so the workers' phase drains all it accepted."""
    r = await ctx.wrk(name, edge.base_url, requests, connections=ctx.opts.connections, server_pid=edge.pid)
    accepted_per_s = r.rps * _accepted(r) / r.requests if r.requests else 0.0
    ctx.note(f"{name}.accepted_per_s", accepted_per_s)
    spooled, _ = await _spool(edge)
    ctx.note(f"{name}.spooled", spooled)

    async def replayed() -> bool:
        return (await _spool(edge))[1] == 0

    await _until(f"{name}: the edge's spool to replay", replayed, 120, every=0.05)
    return accepted_per_s


async def _hello_us(ctx: Ctx, requests: list[Request]) -> float:
    """The bare aiohttp hello-world POST app (``bench.apps hello``, one process) under the
    same wrk as ``cap_full``: its CPU µs per request, from ``/proc/<pid>/stat`` over the
    measured wrk run (the warm-up outside it). Every per-event figure divided by it is in
    hello-worlds, in which the machine's speed cancels out."""
    hello = ctx.procs.app("hello")
    mark: dict[str, float] = {}

    async def opened() -> None:
        mark["cpu0"] = proc_cpu_seconds(hello.pid)

    try:
        r = await ctx.wrk(
            "cap_hello",
            hello.base_url,
            requests,
            connections=ctx.opts.connections,
            server_pid=hello.pid,
            on_start=opened,
        )
        cpu = proc_cpu_seconds(hello.pid) - mark["cpu0"]
    finally:
        hello.stop()
    us = cpu * 1e6 / _accepted(r) if _accepted(r) else 0.0
    ctx.note("cap_hello.cpu_s", cpu)
    ctx.note("cap_hello.us_per_request", us)
    return us


@dataclass
class _Cap:
    """What the part's phases share: its Redis (its own, or the bench's), its copy of the
    bench's database and the bench's own connection to it, the requests wrk and the open
    loop send, and every process it started (stopped at its end)."""

    ctx: Ctx
    redis: Redis
    own: bool  # a Redis of the part's own, not the bench's shared one
    db_url: str
    env: dict[str, str]
    conn: asyncpg.Connection
    requests: list[Request]
    started: list[Proc]

    def start_workers(self, keys: Keys, n: int, tag: str) -> tuple[list[Proc], list[str]]:
        names = [f"bench-{self.ctx.run}-{tag}{i}" for i in range(n)]
        procs = [
            self.ctx.procs.refstream(
                f"worker-{tag}{i}",
                "work",
                REFSTREAM_CONSUMER_NAME=name,
                REFSTREAM_STREAM_PREFIX=keys.prefix,
                **self.env,
            )
            for i, name in enumerate(names)
        ]
        self.started.extend(procs)
        return procs, names

    def meter(self, edge: Proc, workers: list[Proc]) -> Meter:
        return Meter([edge], workers, self.redis, self.db_url, self.conn.get_server_pid())

    async def rows(self) -> int:
        return int(await self.conn.fetchval("SELECT count(*) FROM events"))


async def part_cap(ctx: Ctx) -> None:
    """(cap) CPU per event of each kind of process over a steady run; 1 and 2 edges, 1 and 2 workers."""
    own = await _redis_server(ctx)
    url = own[0] if own else ctx.procs.env["REDIS_URL"]
    redis = connect_redis(Settings(redis_url=url)) if own else ctx.redis
    started: list[Proc] = [own[1]] if own else []
    conn: asyncpg.Connection | None = None
    try:
        ctx.note("cap.redis_own", 1 if own else 0)
        keys1, keys2 = ctx.keys("cap1"), ctx.keys("cap2")
        db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_cap")
        db_url = ctx.world.url(db)
        for k in (keys1, keys2):
            await warm(ctx.world, redis, k, database=db)
        env = {"DATABASE_URL": db_url, "REDIS_URL": url}
        conn = await asyncpg.connect(db_url)
        cap = _Cap(ctx, redis, own is not None, db_url, env, conn, reqs.seed_000(ctx.world), started)
        edge1 = await _edges_alone(cap, keys1, keys2)
        workers1 = await _workers_alone(cap, keys1, keys2)
        await _idle_window(cap, edge1, workers1)
        # bare aiohttp under the same wrk, between the idle and the loaded windows: the unit
        # of the hello-world figures, measured as close as can be to what it divides
        hello_us = await _hello_us(ctx, cap.requests)
        await _full_window(cap, keys1, edge1, workers1, hello_us)
        await _steady_window(cap, keys1, edge1, workers1, hello_us)
    finally:
        if conn is not None:
            await conn.close()
        # the edges and workers first, all at once; the part's Redis once they have gone
        for p in started[1:] if own else started:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        for p in reversed(started):
            p.stop()
        if own:
            await redis.aclose()


async def _edges_alone(cap: _Cap, keys1: Keys, keys2: Keys) -> Proc:
    """(cap_edge1, cap_edge2) The edge alone at 1 process, then 2, each into its own prefix:
    the backlogs of the workers' phases. The first edge is returned, running."""
    ctx, env = cap.ctx, cap.env
    # Both start at once; the second idles through the first's phase
    edge1 = ctx.procs.start_edge("edge1", REFSTREAM_STREAM_PREFIX=keys1.prefix, **env)
    edge2 = ctx.procs.start_edge("edge2", REFSTREAM_STREAM_PREFIX=keys2.prefix, REFSTREAM_PROCESSES="2", **env)
    cap.started += [edge1, edge2]
    ctx.procs.healthy(edge1)
    ctx.procs.healthy(edge2)
    e1 = await _edge_phase(ctx, "cap_edge1", edge1, cap.requests)
    e2 = await _edge_phase(ctx, "cap_edge2", edge2, cap.requests)
    ctx.note("cap_edge2.processes", 2)
    if e1:
        ctx.note("cap_edge2.scale", e2 / e1)
    edge2.stop()
    return edge1


async def _workers_alone(cap: _Cap, keys1: Keys, keys2: Keys) -> list[Proc]:
    """(cap_w1, cap_w2) The workers alone on the edges' backlogs: 1 on the first, then 2 on
    the second. The single worker is returned, running."""
    ctx = cap.ctx
    workers1, names1 = cap.start_workers(keys1, 1, "a")
    w1 = await _drain_rate(ctx, "cap_w1", cap.redis, keys1, workers1, names1)
    workers2, names2 = cap.start_workers(keys2, 2, "b")
    w2 = await _drain_rate(ctx, "cap_w2", cap.redis, keys2, workers2, names2)
    if w1:
        ctx.note("cap_w2.scale", w2 / w1)
    for w in workers2:
        w.stop()
    return workers1


async def _idle_window(cap: _Cap, edge1: Proc, workers1: list[Proc]) -> None:
    """(cap_idle) No load: what the first edge and the worker cost doing nothing (a fixed
    cost per process)."""
    m = cap.meter(edge1, workers1)
    await m.start()
    await asyncio.sleep(cap.ctx.opts.duration)
    cpu = await m.stop()
    for kind in (*KINDS, "pg_bg"):
        cap.ctx.note(f"cap_idle.{kind}_cores", cpu[kind] / cpu["seconds"])


async def _full_window(cap: _Cap, keys1: Keys, edge1: Proc, workers1: list[Proc], hello_us: float) -> None:
    """(cap_full) Full load, closed loop; the warm-up's events are stored before the window
    opens."""
    ctx, redis = cap.ctx, cap.redis
    m = cap.meter(edge1, workers1)
    mark: dict[str, float] = {}

    async def open_window() -> None:
        await _drained(redis, keys1)
        mark["rows0"] = await cap.rows()
        await m.start()
        mark["t0"] = time.monotonic()

    r = await ctx.wrk(
        "cap_full",
        edge1.base_url,
        cap.requests,
        connections=ctx.opts.connections,
        server_pid=edge1.pid,
        on_start=open_window,
    )
    t1, rows1 = time.monotonic(), await cap.rows()
    ctx.note("cap_full.accepted_per_s", r.rps * _accepted(r) / r.requests if r.requests else 0.0)
    ctx.note("cap_full.stored_per_s", (rows1 - mark["rows0"]) / (t1 - mark["t0"]))
    await _drained(redis, keys1)
    cpu = await m.stop()
    note_window(ctx, "cap_full", cpu, _accepted(r), await cap.rows() - int(mark["rows0"]), hello_us, m.relations)


async def _steady_window(cap: _Cap, keys1: Keys, edge1: Proc, workers1: list[Proc], hello_us: float) -> None:
    """(cap) The steady run: open loop at half what the full load sustained (accepted and
    stored); with ``--profile`` profiled, tier by tier."""
    ctx, o, redis = cap.ctx, cap.ctx.opts, cap.redis
    rate = max(1.0, min(ctx.figures["cap_full.accepted_per_s"], ctx.figures["cap_full.stored_per_s"]) / 2)
    await openloop.run(edge1.base_url, cap.requests, rate=rate, seconds=o.warmup)
    await _drained(redis, keys1)
    rows0 = await cap.rows()
    profiling = o.profile_dir is not None
    if profiling:
        pg_statements, pg_said = await cap_profile.pg_statements_state(cap.conn)
        if pg_statements:
            await cap_profile.pg_statements_reset(cap.conn)
        if cap.own:  # never on a shared Redis
            await cap_profile.redis_reset(redis)
    m = cap.meter(edge1, workers1)
    await m.start()
    spies = ctx.profile("cap_edge", edge1.pid, o.duration) + ctx.profile("cap_worker", workers1[0].pid, o.duration)
    sent = await openloop.run(edge1.base_url, cap.requests, rate=rate, seconds=o.duration)
    await _drained(redis, keys1)
    cpu = await m.stop()
    stored = await cap.rows() - rows0
    ctx.note("cap.rate_per_s", sent.rate)
    ctx.note("cap.failed", sent.failed)
    note_window(ctx, "cap", cpu, sent.ok, stored, hello_us, m.relations)
    if profiling:
        for spy in spies:
            await asyncio.to_thread(spy.wait, 60)
        await _write_profiles(cap, stored, pg_statements, pg_said)


async def _write_profiles(cap: _Cap, stored: int, pg_statements: bool, pg_said: str) -> None:
    """The top ten of each tier, as text, in the profile directory (the last run's, as
    py-spy's own files)."""
    ctx = cap.ctx
    assert ctx.opts.profile_dir is not None
    redis_text = (
        await cap_profile.redis_top(cap.redis, stored)
        if cap.own
        else "the bench's shared Redis (no redis-server on PATH): its commandstats count other clients"
        " and are not reset by the bench, so none are taken\n"
    )
    pg_text = pg_said + "\n\n"
    if pg_statements:
        pg_text += await cap_profile.pg_statements_top(cap.conn, stored) + "\n"
    pg_text += await cap_profile.explain_batch(cap.db_url, ctx.world, ctx.opts.batch_size)
    texts = {
        "edge": cap_profile.py_spy_top(ctx.opts.profile_dir / "cap_edge_profile.txt"),
        "worker": cap_profile.py_spy_top(ctx.opts.profile_dir / "cap_worker_profile.txt"),
        "redis": redis_text,
        "postgres": pg_text,
    }
    for tier, text in texts.items():
        (ctx.opts.profile_dir / f"cap_{tier}_top10.txt").write_text(text)
