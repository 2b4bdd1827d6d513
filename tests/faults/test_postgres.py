"""Postgres goes away, restarts under the workers, turns read-only: an outage is waited out,
never dead-lettered; everything accepted is stored once, within 30 s of Postgres returning."""

from __future__ import annotations

import asyncio

import pytest

from ._plan import Plan
from ._servers import PgServer
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


async def test_postgres_down_under_steady_load(stage: Stage, pg_server: PgServer, plan: Plan):
    world = await stage.prepare(workers=2)
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        await stage.mid_batch()  # sessions busy with a batch when the server goes
        await asyncio.to_thread(pg_server.stop, "fast")
        await asyncio.sleep(plan.pg_down_s)  # the outage itself: held, not awaited
        pg_server.start()
        await pg_server.ready()
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    await stage.finish(
        f"postgres down {plan.pg_down_s:.0f}s",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
    )


async def test_postgres_restart_immediate_mid_batch(stage: Stage, pg_server: PgServer, plan: Plan):
    world = await stage.prepare(workers=2)
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        for i in range(plan.pg_restarts):
            if i:
                await asyncio.sleep(2)  # traffic between restarts
            await stage.mid_batch()  # a batch read and not acked: break Postgres under it
            await pg_server.restart("immediate")
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    await stage.finish(
        f"postgres restart -m immediate x{plan.pg_restarts}",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
    )


async def test_postgres_read_only(stage: Stage, pg_server: PgServer, plan: Plan):
    world = await stage.prepare(workers=2)
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        await pg_server.set_read_only(True)
        await asyncio.sleep(plan.read_only_s)
        await pg_server.set_read_only(False)
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    await stage.finish(
        f"postgres read-only {plan.read_only_s:.0f}s",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
    )
