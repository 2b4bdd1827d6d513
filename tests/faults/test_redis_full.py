"""Redis full under ``noeviction``: a filler key of the test's own takes the memory while
workers run. Workers keep running (an outage, never a reason to exit); the edge spools or
answers 503, never 2xx for an event it did not keep; once the filler is gone, everything
accepted is stored once."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ._plan import Plan
from ._servers import FaultRedis
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

MAXMEMORY = 8 * 1024 * 1024
FILLER = "faults:filler"  # not under any refstream prefix: the test's own key


async def top_up(admin: aioredis.Redis) -> bool:
    """APPEND to the filler until Redis refuses, in ever smaller pieces (a single huge SET
    would be refused by its own query buffer; Redis checks memory before a write, so the
    last piece that passes takes it over). True if anything was added."""
    added = False
    for chunk in (256 * 1024, 16 * 1024, 1024):
        for _ in range(2 * MAXMEMORY // chunk):
            try:
                await admin.append(FILLER, b"\0" * chunk)
                added = True
            except ResponseError as exc:
                assert "maxmemory" in str(exc), exc
                break
    return added


async def hold_full(admin: aioredis.Redis, until: float) -> int:
    """Keep Redis full until ``until``: memory the workers free (acks) is taken back at
    once. Returns how many times it had to top up."""
    n = 0
    while time.monotonic() < until:
        n += await top_up(admin)
        await asyncio.sleep(0.05)
    return n


async def test_redis_full_noeviction(private_fault_redis, make_stage, plan: Plan):  # Redis outlives the stage
    server: FaultRedis = await private_fault_redis("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")
    stage: Stage = make_stage(server.url)
    world = await stage.prepare(workers=2)
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            await top_up(admin)
            for _ in range(20):  # full: even a stream entry is refused
                try:
                    await admin.xadd("faults:probe", {"x": "1"})
                    await admin.delete("faults:probe")
                    await top_up(admin)
                except ResponseError as exc:
                    assert "maxmemory" in str(exc), exc
                    break
            else:
                raise AssertionError("Redis could not be filled")
            statuses_before = load.record.statuses.copy()
            top_ups = await hold_full(admin, time.monotonic() + plan.redis_full_s)  # the fault, held
            during = load.record.statuses - statuses_before
            await admin.delete(FILLER)
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        print(f"\nanswers while Redis was full: {dict(during)}; filler topped up {top_ups} times")
        await stage.finish(
            f"redis full {plan.redis_full_s:.0f}s", load.record.accepted, fault_end=fault_end,
            refused=load.record.refused(),
        )  # fmt: skip
    finally:
        await admin.aclose()
