"""Part (cap)'s profiles (``--profile DIR``): a top ten per tier over the steady window,
each written to ``DIR`` as text, beside py-spy's raw stacks and flame graphs.

- The edge and the worker: py-spy (``record --nonblocking``) on each for the window's
  load (``--duration`` seconds); ``cap_edge_top10.txt``, ``cap_worker_top10.txt``: the
  frames by own time (the leaf of each sample) and by total time (every frame on the
  stack, once per sample).
- Redis: ``INFO commandstats`` over the window (``cap_redis_top10.txt``), reset with
  ``CONFIG RESETSTAT`` when the window opens. Only on the part's own ``redis-server``,
  never on a shared one (there the other clients' commands would count, and a reset
  would be theirs too): on a shared Redis the file says so and holds nothing else.
- Postgres (``cap_postgres_top10.txt``): ``pg_stat_statements`` of the bench's database
  over the window, the top ten by execution time, where the server has the extension
  loaded (``shared_preload_libraries``; the bench never changes the server's
  configuration: where it is not loaded the file says so). Then, after the window,
  ``EXPLAIN (ANALYZE, BUFFERS)`` of every statement one worker batch runs: a batch of
  ``REFSTREAM_BATCH_SIZE`` seed 000 clicks (bio.re) through ``write_batch`` (no
  enrichment), each statement explained in a savepoint rolled back before the statement
  itself runs, so the batch stores what it would have; the ten slowest with their plans.

py-spy runs beside the processes it samples (``--nonblocking``: it never stops them), on
the same cores: a profiled run's CPU figures are not the unprofiled run's.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg

from ingest.contract.connections import Redis, create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.settings import Settings
from workers.consumer.store import write_batch

from .world import UAS, World, client_ip

TOP = 10
_EXPLAINABLE = re.compile(r"^\s*(?:--[^\n]*\n\s*)*(WITH|SELECT|INSERT|UPDATE|DELETE)\b", re.I)
_PLANNING = re.compile(r"Planning Time: ([\d.]+) ms")
_EXECUTION = re.compile(r"Execution Time: ([\d.]+) ms")


def py_spy_top(raw_path: Path, n: int = TOP) -> str:
    """The frames of py-spy's raw (collapsed) stacks by own and by total share of samples."""
    if not raw_path.exists():
        return f"no py-spy output at {raw_path} (py-spy missing, or it could not attach: see the bench's log)\n"
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + int(count)
        samples += int(count)
    if not samples:
        return f"py-spy recorded no samples in {raw_path}\n"
    out = [
        f"{samples} samples with Python running (py-spy record --nonblocking, 100/s; idle time not sampled)",
        "",
        "by own time (the leaf frame; own time in the frame that runs the event loop, Runner.run or arq's"
        " Worker.run, is the loop's C code: uvloop's I/O, its callbacks and the syscalls below them):",
    ]
    out += [f"{100 * c / samples:6.1f}%  {f}" for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    # the chain of frames every sample of the main thread holds (the command line, the loop) says nothing
    entry = max(total.values())
    out += ["", "by total time (on the stack), the entry chain on every sample left out:"]
    ranked = [(f, c) for f, c in sorted(total.items(), key=lambda kv: -kv[1]) if c < entry][:n]
    out += [f"{100 * c / samples:6.1f}%  {f}" for f, c in ranked]
    return "\n".join(out) + "\n"


async def redis_reset(redis: Redis) -> None:
    """CONFIG RESETSTAT: only ever called on the part's own redis-server."""
    await redis.config_resetstat()


async def redis_top(redis: Redis, stored: int, n: int = TOP) -> str:
    stats: dict[str, Any] = await redis.info("commandstats")
    rows = []
    for key, v in stats.items():
        name = key.removeprefix("cmdstat_")
        rows.append((name, int(v["calls"]), float(v["usec"])))
    out = [
        f"INFO commandstats over the window (reset by CONFIG RESETSTAT as it opened), {stored} events stored:"
        " each command's own execution time, not the server's I/O around it. A command a script calls counts"
        " both under its own name and within the script's (EVALSHA's) µs, so the rows do not add up",
        "",
        f"{'command':<24}{'calls':>10}{'µs':>12}{'µs/call':>10}{'µs/stored':>11}",
    ]
    for name, calls, u in sorted(rows, key=lambda r: -r[2])[:n]:
        per_stored = u / stored if stored else 0.0
        out.append(f"{name:<24}{calls:>10}{u:>12,.0f}{u / calls:>10.2f}{per_stored:>11.2f}")
    return "\n".join(out) + "\n"


async def pg_statements_state(conn: asyncpg.Connection) -> tuple[bool, str]:
    """(pg_stat_statements usable, what the server says about it)."""
    available = await conn.fetchrow(
        "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
    )
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if available is None:
        return False, "pg_stat_statements is not available on this server (pg_available_extensions has no row)"
    if "pg_stat_statements" not in {p.strip() for p in preload.split(",")}:
        return False, (
            f"pg_stat_statements {available['default_version']} is available on this server but not loaded"
            f" (shared_preload_libraries = {preload!r}); the bench does not change the server's configuration,"
            " so it is not taken: see EXPLAIN (ANALYZE, BUFFERS) below"
        )
    return True, "pg_stat_statements loaded (shared_preload_libraries)"


async def pg_statements_reset(conn: asyncpg.Connection) -> None:
    """This database's statements only (the other databases' are left as they are)."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await conn.execute(
        "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)"
    )


async def pg_statements_top(conn: asyncpg.Connection, stored: int, n: int = TOP) -> str:
    rows = await conn.fetch(
        """
        SELECT calls, total_exec_time, rows, shared_blks_hit, shared_blks_read, shared_blks_dirtied,
               shared_blks_written, wal_bytes, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
        FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        ORDER BY total_exec_time DESC LIMIT $1
        """,
        n,
    )
    out = [f"pg_stat_statements over the window, top {n} by execution time ({stored} events stored)", ""]
    for r in rows:
        per = 1000 * r["total_exec_time"] / stored if stored else 0.0
        out.append(
            f"{r['total_exec_time']:10.1f} ms  {per:8.2f} µs/stored  {r['calls']:>7} calls  {r['rows']:>8} rows"
            f"  hit {r['shared_blks_hit']} read {r['shared_blks_read']} dirtied {r['shared_blks_dirtied']}"
            f" written {r['shared_blks_written']}  wal {int(r['wal_bytes'])} B\n    {r['query']}"
        )
    return "\n".join(out) + "\n"


@dataclass(slots=True)
class _Plan:
    statement: str
    planning_ms: float
    execution_ms: float
    plan: str


@dataclass(slots=True)
class _Explaining:
    """A connection that runs ``EXPLAIN (ANALYZE, BUFFERS)`` of each statement in a
    savepoint, rolls it back, then runs the statement; everything else passes through."""

    conn: asyncpg.Connection
    plans: list[_Plan] = field(default_factory=list)

    async def _explain(self, query: str, args: tuple[Any, ...]) -> None:
        if not _EXPLAINABLE.match(query):
            return
        rows: list[Any] = []
        try:
            async with self.conn.transaction():  # a savepoint inside the batch's transaction
                rows = await self.conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query, *args)
                raise _RolledBack
        except _RolledBack:
            pass
        except asyncpg.PostgresError as exc:  # said in the file; the batch goes on
            rows = [(f"EXPLAIN failed: {exc}",)]
        text = "\n".join(r[0] for r in rows)
        planning, execution = _PLANNING.search(text), _EXECUTION.search(text)
        self.plans.append(
            _Plan(
                statement=query.strip(),
                planning_ms=float(planning.group(1)) if planning else 0.0,
                execution_ms=float(execution.group(1)) if execution else 0.0,
                plan=text,
            )
        )

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self.conn.fetch(query, *args, **kw)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self.conn.fetchrow(query, *args, **kw)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._explain(query, args)
        return await self.conn.fetchval(query, *args, **kw)

    async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
        if args:
            await self._explain(query, args)
        return await self.conn.execute(query, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class _RolledBack(Exception):
    pass


@dataclass(slots=True)
class _Acquired:
    pool: asyncpg.Pool
    plans: list[_Plan]
    _cm: Any = None
    _conn: _Explaining | None = None

    async def __aenter__(self) -> _Explaining:
        self._cm = self.pool.acquire()
        self._conn = _Explaining(await self._cm.__aenter__())
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        self.plans.extend(self._conn.plans)
        await self._cm.__aexit__(*exc)


@dataclass(slots=True)
class _ExplainingPool:
    """Just enough of a pool for ``write_batch``: ``acquire()`` gives an explaining connection."""

    pool: asyncpg.Pool
    plans: list[_Plan] = field(default_factory=list)

    def acquire(self) -> _Acquired:
        return _Acquired(self.pool, self.plans)


def clicks(world: World, n: int) -> list[Envelope]:
    """``n`` seed 000 clicks (bio.re), as the edge appends them."""
    return [
        Envelope(
            type=EventType.CLICK,
            dialect=Dialect.BIORE,
            workspace_id=world.workspace_id,
            ip=client_ip(i),
            user_agent=UAS[i % len(UAS)],
            payload={"code": world.codes[i % len(world.codes)], "referrer": "https://bio.re/alex"},
        )
        for i in range(n)
    ]


async def explain_batch(db_url: str, world: World, batch_size: int, n: int = TOP) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement of one worker batch of seed 000 clicks."""
    pool = await create_pg_pool(Settings(database_url=db_url), max_size=1)
    try:
        explaining = _ExplainingPool(pool)
        t0 = time.monotonic()
        await write_batch(cast(asyncpg.Pool, explaining), clicks(world, batch_size), None)
        wall_ms = 1000 * (time.monotonic() - t0)
    finally:
        await pool.close()
    plans = explaining.plans
    total = sum(p.execution_ms for p in plans) or 1.0
    out = [
        f"EXPLAIN (ANALYZE, BUFFERS) of the {len(plans)} statements one worker batch of {batch_size} seed 000 clicks"
        f" runs (write_batch, no enrichment; each explained in a savepoint rolled back, then run): {total:.1f} ms"
        f" of execution in all, {1000 * total / batch_size:.1f} µs per event; the batch took {wall_ms:.0f} ms"
        " with the EXPLAINs",
        "",
        f"top {n} by execution time:",
    ]
    ranked = sorted(plans, key=lambda p: -p.execution_ms)[:n]
    for i, p in enumerate(ranked, 1):
        first = " ".join(p.statement.split())[:150]
        share, per_event = 100 * p.execution_ms / total, 1000 * p.execution_ms / batch_size
        out.append(
            f"{i:>2}. {p.execution_ms:8.2f} ms ({share:4.1f}%, {per_event:6.1f} µs/event),"
            f" planning {p.planning_ms:.2f} ms: {first}"
        )
    out += ["", "their plans:"]
    for i, p in enumerate(ranked, 1):
        out += ["", f"--- {i}. {' '.join(p.statement.split())[:300]}", p.plan]
    return "\n".join(out) + "\n"
