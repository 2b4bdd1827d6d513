"""What a worker's batch costs by its size: Postgres's CPU and the worker's per event, for
batches of seed 000 clicks (bio.re) through ``write_batch`` with enrichment, committed, into
a fresh database (dropped after), on uvloop and with the collector tuned as the worker runs.
``python -m bench.batch_cost [--sizes 8,16,64,256,1000] [--events 8000] [--rounds 2]``.

Per size: the Postgres backend's CPU (utime + stime from ``/proc/<pid>/stat``: the server
must be local) and this process's over ``--events`` events, each divided by the events;
then the fixed cost of a batch and the cost of an event, fitted from the smallest and the
largest size (cost per event = per event + per batch / size). The figure to read is how
the cost per event falls with the size: why small batches of several partitions share a
transaction (``workers.consumer.combine``).
"""

from __future__ import annotations

import argparse
import os
import secrets

import uvloop

from ingest.contract.connections import create_pg_pool
from ingest.contract.settings import Settings
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch
from workers.host.worker import settle_heap

from . import world as worlds
from .cap_profile import clicks
from .insert_forms import backend_cpu_s, own_cpu_s


async def measure(server: str, sizes: list[int], events: int, rounds: int) -> dict[int, tuple[float, float]]:
    """Per size, the medians over ``rounds`` of (Postgres µs, worker µs) per event."""
    name = f"refstream_batch_cost_{secrets.token_hex(4)}"
    world = await worlds.create(server, name)
    pool = await create_pg_pool(Settings(database_url=world.url()), min_size=1, max_size=1)
    enricher = Enricher()
    got: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        for n in sizes:  # warm: plans cached, devices made, caches full
            await write_batch(pool, clicks(world, n), enricher)
        settle_heap(Settings().batch_size)  # the collector tuned as the worker tunes its own
        for _ in range(rounds):
            for n in sizes:
                batches = [clicks(world, n) for _ in range(max(1, events // n))]
                pg0, py0 = backend_cpu_s(pid), own_cpu_s()
                for batch in batches:
                    await write_batch(pool, batch, enricher)
                pg1, py1 = backend_cpu_s(pid), own_cpu_s()
                done = n * len(batches)
                got[n].append(((pg1 - pg0) / done * 1e6, (py1 - py0) / done * 1e6))
    finally:
        enricher.close()
        await pool.close()
        await worlds.drop_databases(server, name)  # the world's, and its template (name + "_tpl")
    return {n: (sorted(p for p, _ in v)[len(v) // 2], sorted(w for _, w in v)[len(v) // 2]) for n, v in got.items()}


def fit(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(per batch, per event) µs from two sizes' costs per event: c = e + b / n."""
    (n1, c1), (n2, c2) = small, large
    per_batch = (c1 - c2) / (1 / n1 - 1 / n2)
    return per_batch, c2 - per_batch / n2


async def main(sizes: list[int], events: int, rounds: int) -> None:
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    got = await measure(server, sizes, events, rounds)
    print(f"seed 000 clicks through write_batch (enriched), medians of {rounds} rounds, CPU µs per event:")
    print(f"{'batch':>7} {'Postgres':>10} {'worker':>10}")
    for n in sizes:
        print(f"{n:>7} {got[n][0]:>10.1f} {got[n][1]:>10.1f}")
    lo, hi = min(sizes), max(sizes)
    for i, who in enumerate(("Postgres", "worker")):
        per_batch, per_event = fit((lo, got[lo][i]), (hi, got[hi][i]))
        print(f"{who}: {per_batch:,.0f} µs a batch + {per_event:.1f} µs an event (fitted from {lo} and {hi})")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8,16,64,256,1000")
    p.add_argument("--events", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    uvloop.run(main(sorted(int(s) for s in args.sizes.split(",")), args.events, args.rounds))


if __name__ == "__main__":
    cli()
