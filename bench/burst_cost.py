"""What the click_burst rule costs Postgres a click: batches of clicks through ``write_batch``
(enriched, committed) into a fresh database (dropped after), and, where the build judges
bursts after the commit (``workers.consumer.burst_pass``), its pass every ``--tick``
batches. ``python -m bench.burst_cost [--batch 200] [--events 8000] [--tick 5] [--rounds 3]
[--no-rule]`` (``--no-rule``: no fraud rule at all, the floor either side is measured against).

Two loads: ``hot``, seed 000 clicks (bio.re) whose (link, address) pairs come back in every
batch, as at the bench's full load (every pair bursting); ``spread``, every click a pair of
its own. Per load: the Postgres backend's CPU (utime + stime from ``/proc/<pid>/stat``: the
server must be local) per click, in the batches and in the passes, and a batch's wall time
(its transaction: what every event of it waits for). Run it on both sides of a change (the
A/B in docs/benchmarks.md, "The click_burst rule after the commit").
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import time
from typing import Any

import uvloop

from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.settings import Settings
from workers.consumer.enrich import Enricher
from workers.consumer.store import LIVE, Effects, write_batch

from . import world as worlds
from .cap_profile import clicks
from .insert_forms import backend_cpu_s


def _pass() -> Any:
    """The build's post-commit pass, or None where the rule runs in the batch."""
    try:
        return importlib.import_module("workers.consumer.burst_pass")
    except ImportError:
        return None


def spread(world: worlds.World, n: int, start: int) -> list[Envelope]:
    """``n`` clicks, each from an address no other click of the run has."""
    return [
        Envelope(
            type=EventType.CLICK,
            dialect=Dialect.BIORE,
            workspace_id=world.workspace_id,
            ip=f"81.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}",
            user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
            payload={"code": world.codes[k % len(world.codes)], "referrer": "https://bio.re/alex"},
        )
        for k in range(start, start + n)
    ]


async def measure(
    server: str, batch: int, events: int, tick: int, rounds: int, rule: bool = True
) -> dict[str, list[float]]:
    """Per load, the medians over ``rounds`` of (batches' Postgres µs a click, passes'
    Postgres µs a click, a batch's ms); without ``rule``, the batches run no fraud rule."""
    effects = LIVE if rule else Effects(fraud=False)
    name = f"refstream_burst_cost_{secrets.token_hex(4)}"
    world = await worlds.create(server, name)
    pool = await create_pg_pool(Settings(database_url=world.url()), min_size=1, max_size=1)
    enricher = Enricher()
    judge = _pass() if rule else None
    got: dict[str, list[tuple[float, float, float]]] = {"hot": [], "spread": []}
    k = 0
    try:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        await write_batch(pool, clicks(world, batch), enricher, effects)  # warm: plans cached, devices made
        if judge is not None:
            await judge.run(pool)
        for _ in range(rounds):
            for load in got:
                n = max(1, events // batch)
                batch_s = pass_s = wall = 0.0
                for i in range(n):
                    sent = clicks(world, batch) if load == "hot" else spread(world, batch, k)
                    k += batch
                    t0, w0 = backend_cpu_s(pid), time.perf_counter()
                    await write_batch(pool, sent, enricher, effects)
                    wall += time.perf_counter() - w0
                    t1 = backend_cpu_s(pid)
                    batch_s += t1 - t0
                    if judge is not None and (i + 1) % tick == 0:
                        while (await judge.run(pool)).taken:
                            pass
                        pass_s += backend_cpu_s(pid) - t1
                done = n * batch
                got[load].append((batch_s / done * 1e6, pass_s / done * 1e6, wall / n * 1000))
    finally:
        enricher.close()
        await pool.close()
        await worlds.drop_databases(server, name)
    return {load: [sorted(r[i] for r in v)[len(v) // 2] for i in range(3)] for load, v in got.items()}


async def main(batch: int, events: int, tick: int, rounds: int, rule: bool) -> None:
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    got = await measure(server, batch, events, tick, rounds, rule)
    where = f"after the commit, a pass every {tick} batches" if _pass() else "in the batch's transaction"
    where = where if rule else "not run (no fraud rule)"
    print(f"click_burst {where}; batches of {batch} clicks, medians of {rounds} rounds:")
    print(f"{'load':>7} {'batch µs/click':>15} {'pass µs/click':>14} {'Postgres µs/click':>18} {'batch ms':>9}")
    for load, (b, p, ms) in got.items():
        print(f"{load:>7} {b:>15.1f} {p:>14.1f} {b + p:>18.1f} {ms:>9.1f}")


def cli() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.burst_cost")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--events", type=int, default=8000)
    ap.add_argument("--tick", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-rule", action="store_true", help="the batches without their fraud rules: the floor")
    a = ap.parse_args()
    uvloop.run(main(a.batch, a.events, a.tick, a.rounds, not a.no_rule))


if __name__ == "__main__":
    cli()
