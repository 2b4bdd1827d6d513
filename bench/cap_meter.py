"""The meter of part (cap)'s windows (``bench.capacity_parts``), and what it notes of one.

A window's figures: the edge and the worker from ``/proc/<pid>/stat`` (utime + stime,
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
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncpg

from ingest.contract.connections import Redis

from .context import Ctx
from .procs import Proc
from .wrk import proc_cpu_seconds

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


def note_window(
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
