"""The edge's spool through a Redis outage, under load: an edge SIGKILLed with events in its
spool and started again once Redis is back; two edges sharing one spool directory. Every
event answered 2xx is stored exactly once (I1-I3): nothing spooled is lost with the edge,
nothing is drained by both edges."""

from __future__ import annotations

import asyncio

import pytest

from ._load import Load
from ._plan import Plan
from ._spool import durable_redis, edges, kill_edge, merge, redis_down, redis_up, spooled
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


async def test_spool_edge_killed_with_a_full_spool(private_fault_redis, make_stage, plan: Plan):
    server = await durable_redis(private_fault_redis)
    stage: Stage = make_stage(server.url)
    world = await stage.prepare(workers=2)
    async with stage.load(world) as before:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        redis_down(server)
        await asyncio.sleep(plan.redis_full_s)  # the outage, under load: public events go to the spool
        (edge,) = edges(stage)
        await kill_edge(stage, edge)  # SIGKILL, with the spool full of accepted events
    held = spooled(stage)
    assert held > 0, "nothing was spooled"
    await redis_up(server)
    fault_end = await stage.fault_over()
    await stage.start_edge()  # a new edge on the same spool directory drains what the dead one kept
    async with stage.load(world) as after:
        await asyncio.sleep(plan.tail_s)
    print(f"\nspooled when the edge was killed: {held}; answers before the kill: {dict(before.record.statuses)}")
    await stage.finish(
        f"spool: edge SIGKILLed with {held} spooled",
        merge(before.record.accepted, after.record.accepted),
        fault_end=fault_end,
        refused=before.record.refused() + after.record.refused(),
    )


async def test_spool_two_edges_share_a_directory(private_fault_redis, make_stage, plan: Plan):
    server = await durable_redis(private_fault_redis)
    stage: Stage = make_stage(server.url)
    world = await stage.prepare(workers=2)
    first = stage.base
    second = await stage.start_edge()  # the same settings: the same spool directory
    half = plan.rate / 2
    async with (
        Load(first, world.codes, seed=1, rate=half, api_key=world.api_key) as a,
        Load(second, world.codes, seed=2, rate=half, api_key=world.api_key) as b,
    ):
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        redis_down(server)
        await asyncio.sleep(plan.redis_full_s)
        held = spooled(stage)
        await redis_up(server)
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    assert held > 0, "nothing was spooled"
    print(f"\nspooled by both edges at the end of the outage: {held}")
    await stage.finish(
        f"spool: two edges, one directory, {held} spooled",
        merge(a.record.accepted, b.record.accepted),
        fault_end=fault_end,
        refused=a.record.refused() + b.record.refused(),
    )
