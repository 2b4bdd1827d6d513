"""Workers die: SIGKILL at random under load (each replaced), and SIGTERM in the middle of a
batch (a clean exit that commits and acks what it holds). Nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from ._plan import Plan
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


async def test_sigkill_storm(stage: Stage, plan: Plan):
    rng = random.Random(20240611)
    world = await stage.prepare(workers=3)
    kills = []
    async with stage.load(world) as load:
        await asyncio.sleep(plan.warmup_s)
        await stage.storing()
        storm_end = time.monotonic() + plan.storm_s
        while time.monotonic() < storm_end:
            await asyncio.sleep(rng.uniform(2, 5))  # the storm's rhythm, not a synchronisation
            victim = rng.choice(stage.alive())
            held = await stage.holding(victim, within=2.0)  # in the middle of a batch, if it gets one
            assert await stage.kill_worker(victim, signal.SIGKILL) == -signal.SIGKILL
            kills.append((victim, held))
            stage.start_worker()  # its replacement, under a new consumer name
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    print(f"\nkilled (worker, entries it held): {kills}")
    await stage.finish(
        f"SIGKILL storm {plan.storm_s:.0f}s ({len(kills)} kills)",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
    )


async def test_sigterm_mid_batch(stage: Stage, plan: Plan):
    world = await stage.prepare(workers=0)
    problems = []
    async with stage.load(world) as load:
        # a backlog, so that the worker is busy with one batch after another
        await load.burst(plan.sigterm_backlog)
        victim = stage.start_worker(REFSTREAM_BATCH_SIZE="500")
        await stage.storing()
        deadline = time.monotonic() + 30
        while (held := await stage.consumer_pending(victim)) == 0:  # a batch read, not yet acked
            assert time.monotonic() < deadline, "the worker never held a batch"
            await asyncio.sleep(0.002)
        proc = stage.signal_worker(victim, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        fault_end = await stage.fault_over()
        if code != 0:
            problems.append(f"SIGTERM: the worker exited {code}, not 0")
        if left := await stage.consumer_pending(victim):
            problems.append(
                f"SIGTERM: the worker left {left} entries pending (held {held} when signalled):"
                " the batch in flight was not committed and acked"
            )
        stage.start_worker()  # the rest of the backlog, and the steady load
        await asyncio.sleep(plan.tail_s)
    await stage.finish(
        f"SIGTERM mid-batch (held {held})",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=problems,
    )
