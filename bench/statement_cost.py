"""What each statement of a worker's batch costs: Postgres's CPU and the worker's, statement
by statement, for batches of seed 000 clicks (bio.re) through ``write_batch`` with
enrichment, committed, into a fresh database (dropped after), on uvloop as the worker runs.
``python -m bench.statement_cost [--size 64] [--batches 300]``.

Where ``pg_stat_statements`` is not loaded (the bench never changes a server's
configuration), this is the per-statement profile: every call of asyncpg's ``Connection``
that sends a statement (``execute``, ``fetch``, ``fetchrow``, ``fetchval``: the pool's reset
is its query through ``execute``) is timed by the Postgres backend's CPU (``/proc/<pid>/schedstat``, nanoseconds:
the server must be local) and this process's (``time.process_time_ns``), over
``--batches`` batches of ``--size`` clicks after a few to warm up, summed by the
statement's text. The worker's figure includes the wrapping's own small cost; the totals
per batch are measured without it, around the whole run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvloop
from asyncpg.connection import Connection

from ingest.contract.connections import create_pg_pool
from ingest.contract.settings import Settings
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch
from workers.host.worker import settle_heap

from . import world as worlds
from .cap_profile import clicks

_SENDING = ("execute", "fetch", "fetchrow", "fetchval")


def backend_cpu_ns(pid: int) -> int:
    """A local Postgres backend's time on a CPU so far, in nanoseconds."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


@dataclass(slots=True)
class Cost:
    calls: int = 0
    postgres_ns: int = 0
    worker_ns: int = 0


@contextmanager
def timed(pid: int, costs: dict[str, Cost]) -> Iterator[None]:
    """asyncpg's sending methods timed into ``costs`` by statement, while inside."""
    originals = {name: getattr(Connection, name) for name in _SENDING}

    def wrap(name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed_call(self: Connection, *args: Any, **kwargs: Any) -> Any:
            label = " ".join(str(args[0]).split())[:100]
            pg0, py0 = backend_cpu_ns(pid), time.process_time_ns()
            try:
                return await original(self, *args, **kwargs)
            finally:
                cost = costs.setdefault(label, Cost())
                cost.calls += 1
                cost.postgres_ns += backend_cpu_ns(pid) - pg0
                cost.worker_ns += time.process_time_ns() - py0

        return timed_call

    for name, original in originals.items():
        setattr(Connection, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Connection, name, original)


async def measure(server: str, size: int, batches: int) -> tuple[float, float, dict[str, Cost]]:
    """Postgres's and the worker's µs a batch, unwrapped; then each statement's costs."""
    name = f"refstream_statement_cost_{secrets.token_hex(4)}"
    world = await worlds.create(server, name)
    pool = await create_pg_pool(Settings(database_url=world.url()), min_size=1, max_size=1)
    enricher = Enricher()
    costs: dict[str, Cost] = {}
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        for _ in range(5):  # warm: plans cached, dictionaries made, caches full
            await write_batch(pool, clicks(world, size), enricher)
        settle_heap(Settings().batch_size)  # the collector tuned as the worker tunes its own
        work = [clicks(world, size) for _ in range(batches)]
        pg0, py0 = backend_cpu_ns(pid), time.process_time_ns()
        for batch in work[: batches // 2]:
            await write_batch(pool, batch, enricher)
        pg_ns, py_ns = backend_cpu_ns(pid) - pg0, time.process_time_ns() - py0
        with timed(pid, costs):
            for batch in work[batches // 2 :]:
                await write_batch(pool, batch, enricher)
    finally:
        enricher.close()
        await pool.close()
        await worlds.drop_databases(server, name)  # the world's, and its template (name + "_tpl")
    half = batches // 2
    return pg_ns / half / 1000, py_ns / half / 1000, costs


async def main(size: int, batches: int) -> None:
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    pg_us, py_us, costs = await measure(server, size, batches)
    timed_batches = batches - batches // 2
    print(f"batches of {size} seed 000 clicks through write_batch (enriched), CPU µs a batch:")
    print(f"  all of it: Postgres {pg_us:,.0f}, the worker {py_us:,.0f} ({batches // 2} batches, unwrapped)")
    print(f"  by statement ({timed_batches} batches; the worker's with the wrapping's own cost):")
    print(f"  {'calls':>6} {'Postgres':>9} {'worker':>8}  statement")
    for label, cost in sorted(costs.items(), key=lambda kv: -kv[1].postgres_ns):
        print(
            f"  {cost.calls / timed_batches:>6.1f} {cost.postgres_ns / timed_batches / 1000:>9,.0f}"
            f" {cost.worker_ns / timed_batches / 1000:>8,.0f}  {label}"
        )


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batches", type=int, default=300)
    args = p.parse_args()
    uvloop.run(main(args.size, args.batches))


if __name__ == "__main__":
    cli()
