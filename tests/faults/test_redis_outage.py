"""Redis unavailable under load, two ways: killed (and restarted from its AOF), and
blackholed by a TCP proxy that keeps every connection open and swallows every byte (no
reset: only a timeout can tell). Either way public routes answer 2xx from the spool, keyed
routes 503 with Retry-After, every answer comes within the edge's deadline (no pile-up),
and afterwards everything accepted is stored exactly once (I1-I3)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from .._proxy import Proxy
from ._load import Record
from ._plan import Plan
from ._servers import FaultRedis
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

DEADLINE_MS = 1000  # REFSTREAM_REDIS_DEADLINE_MS's default
# a public request may meet the deadline twice (its lookup, then its append) before the
# breaker fails fast, and ask Postgres for the link in between (at most 1 s): 3 s is the
# bound of a correct edge; a pile-up of connect timeouts blows through it within seconds
ANSWER_BOUND_S = 3 * DEADLINE_MS / 1000
PUBLIC = ("biore", "affitor", "convert")


def during(record: Record, since: float, until: float) -> Counter[str]:
    return Counter(f"{kind} {status}" for at, _, kind, status in record.answers if since <= at < until)


def check_answers(record: Record, since: float, until: float) -> list[str]:
    """What the edge must have answered while Redis was away; a problem per violation."""
    problems = []
    got = during(record, since, until)
    for key, n in got.items():
        kind, status = key.split()
        if kind in PUBLIC and status != "200":
            problems.append(f"{n} public {kind} requests answered {status} while Redis was away")
        if kind == "lead" and status not in ("200", "503"):
            problems.append(f"{n} keyed leads answered {status} while Redis was away")
    if not any(k.startswith("lead 503") for k in got):
        problems.append(f"no keyed request was refused while Redis was away: {dict(got)}")
    times = record.answer_times(since, until)
    if times:
        p99 = times[int(0.99 * (len(times) - 1))]
        if p99 > ANSWER_BOUND_S:
            problems.append(f"p99 answer time {p99:.2f}s over the {ANSWER_BOUND_S:.1f}s bound (a pile-up)")
    return problems


def figures(record: Record, since: float, until: float, shed_before: int) -> str:
    times = record.answer_times(since, until)
    p50 = times[len(times) // 2] if times else 0.0
    p99 = times[int(0.99 * (len(times) - 1))] if times else 0.0
    return (
        f"answers while Redis was away: {dict(during(record, since, until))}; p50 {p50 * 1000:.0f} ms,"
        f" p99 {p99 * 1000:.0f} ms, max {max(times, default=0) * 1000:.0f} ms; shed {record.shed - shed_before}"
    )


async def test_redis_down_under_load(private_fault_redis, make_stage, plan: Plan):
    # appendfsync always: a Redis process that crashes keeps what it acknowledged (primary
    # durability). Under everysec Redis postpones its AOF write (up to 2 s) while a slow
    # background fsync runs and answers all the same, so a kill can lose acknowledged writes
    server: FaultRedis = await private_fault_redis("--appendonly", "yes", "--appendfsync", "always")
    stage: Stage = make_stage(server.url)
    world = await stage.prepare(workers=2)
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        shed = load.record.shed
        since = time.monotonic()
        server.kill()
        await asyncio.sleep(plan.redis_down_s)  # the fault, held: nothing to await in it
        until = time.monotonic()
        server.start()  # same port, same directory: the AOF is replayed
        await server.ready()
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    print("\n" + figures(load.record, since, until, shed))
    await stage.finish(
        f"redis down {plan.redis_down_s:.0f}s",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=check_answers(load.record, since, until),
    )


async def test_redis_blackholed_under_load(private_fault_redis, make_stage, plan: Plan):
    server: FaultRedis = await private_fault_redis()
    proxy = Proxy(server.port)
    await proxy.start()
    try:
        stage: Stage = make_stage(proxy.url, check_url=server.url)  # edge and workers through the proxy
        world = await stage.prepare(workers=2)
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            shed = load.record.shed
            since = time.monotonic()
            proxy.blackhole()
            await asyncio.sleep(plan.blackhole_s)  # the fault, held
            until = time.monotonic()
            proxy.heal()
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        # shed (the load's 64 in flight at once) is reported, not judged: in the first
        # deadline, before the breaker opens, rate x deadline requests wait (80 in short mode)
        problems = check_answers(load.record, since, until)
        print("\n" + figures(load.record, since, until, shed) + f"; {proxy.dropped} bytes swallowed")
        await stage.finish(
            f"redis blackholed {plan.blackhole_s:.0f}s",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
            problems=problems,
        )
    finally:
        await proxy.close()
