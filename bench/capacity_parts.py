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
inside it. Over it: the edge and the worker from ``/proc/<pid>/stat`` (utime + stime,
children included: the prefork edge's supervisor and its children); Redis from
``INFO cpu`` (used_cpu_sys + used_cpu_user); Postgres as the sum over the backends of
``pg_stat_activity`` in the bench's database (the edge's and the workers' connections,
autovacuum workers on it; never the bench's own two), read from ``/proc/<pid>/stat`` every
``PG_SAMPLE_S`` and at both ends, a backend first seen after the window opened counted
from zero. Postgres's background writer, walwriter and checkpointer are reported apart
(``pg_bg``): they serve every database of the server, so on a shared server they count
other work too. Accepted events are the load generator's 2xx answers; stored events the
rows the window added to ``events``; ``db_bytes_per_stored`` what ``pg_database_size``
grew by per stored event, ``events_bytes_per_stored`` what the ``events`` table's
partitions (indexes included) grew by, and ``bytes_per_stored.<relation>`` what each
relation that grew did (``pg_relation_size`` of its main, free-space and visibility
forks; a partition under its parent table or index, a TOAST table and its index under
``<table>_toast``), ``bytes_per_stored.total`` their net sum.

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
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

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
from .context import Ctx
from .pipeline_parts import _until
from .procs import Proc
from .world import backlog, copy_database, warm
from .wrk import Request, WrkResult, proc_cpu_seconds

KINDS = ("edge", "worker", "redis", "pg")
PG_SAMPLE_S = 0.25
PG_BACKGROUND = ("background writer", "walwriter", "checkpointer")
_TICKS = os.sysconf("SC_CLK_TCK")

# bytes of the bench's database, and of the events table's partitions (indexes included)
_SIZES = """
SELECT pg_database_size(current_database()) AS db,
       (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits
        WHERE inhparent = 'events'::regclass)::bigint AS events,
       (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits
"""
# bytes of every relation with storage, by name: a partition's under its parent's (and a
# partition's index under its parent index's), a TOAST table and its index under
# ``<table>_toast``; main, free-space and visibility forks
_RELATIONS = """
SELECT CASE WHEN owner.oid IS NULL THEN root.relname ELSE oroot.relname || '_toast' END AS name,
       sum(coalesce(pg_relation_size(c.oid, 'main') + pg_relation_size(c.oid, 'fsm')
                    + pg_relation_size(c.oid, 'vm'), 0))::bigint AS bytes
FROM pg_class c
LEFT JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_class owner ON owner.reltoastrelid <> 0
     AND owner.reltoastrelid = CASE WHEN c.relkind = 't' THEN c.oid ELSE i.indrelid END
LEFT JOIN pg_class oroot ON oroot.oid = coalesce(pg_partition_root(owner.oid), owner.oid)
JOIN pg_class root ON root.oid = coalesce(pg_partition_root(c.oid), c.oid)
WHERE c.relkind IN ('r', 'i', 't', 'm')
GROUP BY 1
"""
_PG_PIDS = """
SELECT pid, datname IS NOT NULL AS ours FROM pg_stat_activity
WHERE (datname = current_database() AND pid <> ALL($1::int[])) OR backend_type = ANY($2::text[])
"""


async def _drained(redis: Redis, keys: Keys, limit_s: float = 600) -> float:
    async def empty() -> bool:
        return (await backlog(redis, keys))[0] == 0

    return await _until("the workers to drain the streams", empty, limit_s, every=0.05)


def _postgres_cpu(pid: int) -> float | None:
    """utime + stime of one Postgres process, None when it is not readable as one (gone,
    another pid namespace: its /proc entry must name a postgres process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if not stat[stat.find("(") + 1 : stat.rfind(")")].startswith("postgres"):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Meter:
    """CPU seconds of the edges, the workers, Redis and Postgres over one window, and what
    the bench's database grew by."""

    def __init__(self, edges: list[Proc], workers: list[Proc], redis: Redis, db_url: str, exclude: int) -> None:
        self.edges, self.workers, self.redis, self.db_url = edges, workers, redis, db_url
        self.exclude = [exclude]
        self.pg: dict[int, tuple[float, float, bool]] = {}  # pid -> (at the start, last read, ours)
        self.start_cpu: dict[str, float] = {}
        self.opened = False
        self.t0 = 0.0
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._sizes0: dict[str, int] = {}
        self._relations0: dict[str, int] = {}
        self.own_statements = 0  # the meter's own transactions in the database, not the workers'
        self.relations: dict[str, float] = {}  # name -> bytes grown over the window

    async def _redis_cpu(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def _proc_cpu(self) -> dict[str, float]:
        return {
            "edge": sum(proc_cpu_seconds(p.pid) for p in self.edges),
            "worker": sum(proc_cpu_seconds(p.pid) for p in self.workers),
        }

    async def _sample_pg(self) -> None:
        assert self._conn is not None
        self.own_statements += 1
        for r in await self._conn.fetch(_PG_PIDS, self.exclude, list(PG_BACKGROUND)):
            cpu = _postgres_cpu(r["pid"])
            if cpu is None:
                continue
            first = self.pg[r["pid"]][0] if r["pid"] in self.pg else cpu if not self.opened else 0.0
            self.pg[r["pid"]] = (first, cpu, r["ours"])

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(PG_SAMPLE_S)
            await self._sample_pg()

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.db_url)
        self.exclude.append(await self._conn.fetchval("SELECT pg_backend_pid()"))
        await self._conn.execute("SELECT pg_stat_force_next_flush()")  # the commits counted so far
        self._sizes0 = dict(await self._conn.fetchrow(_SIZES))
        self._relations0 = {r["name"]: r["bytes"] for r in await self._conn.fetch(_RELATIONS)}
        await self._sample_pg()
        self.opened = True
        self.start_cpu = {**self._proc_cpu(), "redis": await self._redis_cpu()}
        self.t0 = time.monotonic()
        self._task = asyncio.create_task(self._sampler())

    async def stop(self) -> dict[str, float]:
        """CPU seconds per kind (``pg_bg`` apart), the window's seconds, the growth in bytes of
        the database and of the events table's partitions."""
        assert self._conn is not None and self._task is not None
        end = {**self._proc_cpu(), "redis": await self._redis_cpu()}
        seconds = time.monotonic() - self.t0
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        try:
            await self._sample_pg()
            # a backend reports its commits to pg_stat_database about once a second, so each end
            # of the window lags by up to a second's, alike under a steady load; the meter's
            # own transactions (its first reads and its samples) are taken off
            await self._conn.execute("SELECT pg_stat_force_next_flush()")
            sizes = dict(await self._conn.fetchrow(_SIZES))
            relations = {r["name"]: r["bytes"] for r in await self._conn.fetch(_RELATIONS)}
        finally:
            await self._conn.close()
        out = {k: end[k] - self.start_cpu[k] for k in end}
        out["pg"] = sum(last - first for first, last, ours in self.pg.values() if ours)
        out["pg_bg"] = sum(last - first for first, last, ours in self.pg.values() if not ours)
        out["pg_backends"] = sum(1 for *_, ours in self.pg.values() if ours)
        out["seconds"] = seconds
        out["db_bytes"] = float(sizes["db"] - self._sizes0["db"])
        out["events_bytes"] = float(sizes["events"] - self._sizes0["events"])
        own = 2 + self.own_statements + 1  # the first sizes and relations, the samples, the flush
        out["commits"] = float(max(0, sizes["commits"] - self._sizes0["commits"] - own))
        names = set(relations) | set(self._relations0)
        self.relations = {n: float(relations.get(n, 0) - self._relations0.get(n, 0)) for n in names}
        return out


def _note_window(
    ctx: Ctx, name: str, cpu: dict[str, float], accepted: int, stored: int, hello_us: float, relations: dict[str, float]
) -> None:
    """Every per-event CPU figure in µs and in hello-worlds (µs ÷ ``hello_us``, the bare
    aiohttp app's CPU µs per request in the same run), and the bytes per stored event of
    every relation that grew."""
    ctx.note(f"{name}.accepted", accepted)
    ctx.note(f"{name}.stored", stored)
    ctx.note(f"{name}.window_s", cpu["seconds"])
    ctx.note(f"{name}.pg_backends", cpu["pg_backends"])
    ctx.note(f"{name}.commits_per_s", cpu["commits"] / cpu["seconds"])
    ctx.note(f"{name}.stored_per_commit", stored / cpu["commits"] if cpu["commits"] else 0.0)
    for kind in (*KINDS, "pg_bg"):
        ctx.note(f"{name}.{kind}_cores", cpu[kind] / cpu["seconds"])
    cpu = {**cpu, "total": sum(cpu[k] for k in KINDS)}
    for kind in (*KINDS, "pg_bg", "total"):
        for per, n in (("accepted", accepted), ("stored", stored)):
            us = cpu[kind] * 1e6 / n if n else 0.0
            ctx.note(f"{name}.{kind}_us_per_{per}", us)
            ctx.note(f"{name}.{kind}_hw_per_{per}", us / hello_us if hello_us else 0.0)
    ctx.note(f"{name}.db_bytes_per_stored", cpu["db_bytes"] / stored if stored else 0.0)
    ctx.note(f"{name}.events_bytes_per_stored", cpu["events_bytes"] / stored if stored else 0.0)
    for rel, grown in relations.items():
        if grown > 0 and stored:
            ctx.note(f"{name}.bytes_per_stored.{rel}", grown / stored)
    ctx.note(f"{name}.bytes_per_stored.total", sum(relations.values()) / stored if stored else 0.0)


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


def _write_profiles(ctx: Ctx, redis_text: str, pg_text: str) -> None:
    """The top ten of each tier, as text, in the profile directory (the last run's, as
    py-spy's own files)."""
    assert ctx.opts.profile_dir is not None
    texts = {
        "edge": cap_profile.py_spy_top(ctx.opts.profile_dir / "cap_edge_profile.txt"),
        "worker": cap_profile.py_spy_top(ctx.opts.profile_dir / "cap_worker_profile.txt"),
        "redis": redis_text,
        "postgres": pg_text,
    }
    for tier, text in texts.items():
        (ctx.opts.profile_dir / f"cap_{tier}_top10.txt").write_text(text)


async def part_cap(ctx: Ctx) -> None:
    """(cap) CPU per event of each kind of process over a steady run; 1 and 2 edges, 1 and 2 workers."""
    o = ctx.opts
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
        requests = reqs.seed_000(ctx.world)

        def start_workers(keys: Keys, n: int, tag: str) -> tuple[list[Proc], list[str]]:
            names = [f"bench-{ctx.run}-{tag}{i}" for i in range(n)]
            procs = [
                ctx.procs.refstream(
                    f"worker-{tag}{i}", "work", REFSTREAM_CONSUMER_NAME=name, REFSTREAM_STREAM_PREFIX=keys.prefix, **env
                )
                for i, name in enumerate(names)
            ]
            started.extend(procs)
            return procs, names

        # the edge alone at 1 process, then 2, each into its own prefix: the backlogs of the
        # workers' phases. Both start at once; the second idles through the first's phase
        edge1 = ctx.procs.start_edge("edge1", REFSTREAM_STREAM_PREFIX=keys1.prefix, **env)
        edge2 = ctx.procs.start_edge("edge2", REFSTREAM_STREAM_PREFIX=keys2.prefix, REFSTREAM_PROCESSES="2", **env)
        started += [edge1, edge2]
        ctx.procs.healthy(edge1)
        ctx.procs.healthy(edge2)
        e1 = await _edge_phase(ctx, "cap_edge1", edge1, requests)
        e2 = await _edge_phase(ctx, "cap_edge2", edge2, requests)
        ctx.note("cap_edge2.processes", 2)
        if e1:
            ctx.note("cap_edge2.scale", e2 / e1)
        edge2.stop()

        # the workers alone on those backlogs: 1 on the first, then 2 on the second
        workers1, names1 = start_workers(keys1, 1, "a")
        w1 = await _drain_rate(ctx, "cap_w1", redis, keys1, workers1, names1)
        workers2, names2 = start_workers(keys2, 2, "b")
        w2 = await _drain_rate(ctx, "cap_w2", redis, keys2, workers2, names2)
        if w1:
            ctx.note("cap_w2.scale", w2 / w1)
        for w in workers2:
            w.stop()

        def meter() -> Meter:
            assert conn is not None
            return Meter([edge1], workers1, redis, db_url, conn.get_server_pid())

        async def rows() -> int:
            assert conn is not None
            return int(await conn.fetchval("SELECT count(*) FROM events"))

        # no load: what the first edge and the worker cost doing nothing (a fixed cost per process)
        m = meter()
        await m.start()
        await asyncio.sleep(o.duration)
        cpu = await m.stop()
        for kind in (*KINDS, "pg_bg"):
            ctx.note(f"cap_idle.{kind}_cores", cpu[kind] / cpu["seconds"])

        # bare aiohttp under the same wrk, between the idle and the loaded windows: the unit
        # of the hello-world figures, measured as close as can be to what it divides
        hello_us = await _hello_us(ctx, requests)

        # full load, closed loop; the warm-up's events are stored before the window opens
        m = meter()
        mark: dict[str, float] = {}

        async def open_window() -> None:
            await _drained(redis, keys1)
            mark["rows0"] = await rows()
            await m.start()
            mark["t0"] = time.monotonic()

        r = await ctx.wrk(
            "cap_full", edge1.base_url, requests, connections=o.connections, server_pid=edge1.pid, on_start=open_window
        )
        t1, rows1 = time.monotonic(), await rows()
        ctx.note("cap_full.accepted_per_s", r.rps * _accepted(r) / r.requests if r.requests else 0.0)
        ctx.note("cap_full.stored_per_s", (rows1 - mark["rows0"]) / (t1 - mark["t0"]))
        await _drained(redis, keys1)
        cpu = await m.stop()
        _note_window(ctx, "cap_full", cpu, _accepted(r), await rows() - int(mark["rows0"]), hello_us, m.relations)

        # the steady run: open loop at half what the full load sustained (accepted and stored)
        rate = max(1.0, min(ctx.figures["cap_full.accepted_per_s"], ctx.figures["cap_full.stored_per_s"]) / 2)
        await openloop.run(edge1.base_url, requests, rate=rate, seconds=o.warmup)
        await _drained(redis, keys1)
        rows0 = await rows()
        profiling = o.profile_dir is not None
        if profiling:
            pg_statements, pg_said = await cap_profile.pg_statements_state(conn)
            if pg_statements:
                await cap_profile.pg_statements_reset(conn)
            if own:  # never on a shared Redis
                await cap_profile.redis_reset(redis)
        m = meter()
        await m.start()
        spies = ctx.profile("cap_edge", edge1.pid, o.duration) + ctx.profile("cap_worker", workers1[0].pid, o.duration)
        sent = await openloop.run(edge1.base_url, requests, rate=rate, seconds=o.duration)
        await _drained(redis, keys1)
        cpu = await m.stop()
        stored = await rows() - rows0
        ctx.note("cap.rate_per_s", sent.rate)
        ctx.note("cap.failed", sent.failed)
        _note_window(ctx, "cap", cpu, sent.ok, stored, hello_us, m.relations)
        if profiling:
            for spy in spies:
                await asyncio.to_thread(spy.wait, 60)
            redis_text = (
                await cap_profile.redis_top(redis, stored)
                if own
                else "the bench's shared Redis (no redis-server on PATH): its commandstats count other clients"
                " and are not reset by the bench, so none are taken\n"
            )
            pg_text = pg_said + "\n\n"
            if pg_statements:
                pg_text += await cap_profile.pg_statements_top(conn, stored) + "\n"
            pg_text += await cap_profile.explain_batch(db_url, ctx.world, o.batch_size)
            _write_profiles(ctx, redis_text, pg_text)
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
