"""Two workers race a milestone threshold: an affiliate's conversions arrive on two of its
links at once, on different partitions, so two batches in two transactions move its total
across the threshold together. Exactly one milestone row, every round, for every affiliate."""

from __future__ import annotations

import asyncio
import time

import pytest

from ._plan import Plan
from ._stage import Stage, code_on

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


async def test_two_workers_race_a_milestone_threshold(stage: Stage, plan: Plan):
    world = await stage.prepare(workers=0)
    rounds, n = plan.milestone_rounds, plan.milestone_affiliates
    # round k brings every affiliate from 2k-2 to 2k conversions: threshold 2k is crossed by
    # two conversions committed by two batches at the same moment
    program = await stage.api(
        "POST",
        "/v1/programs",
        {"name": "Race", "milestones": [{"name": f"Refer {2 * k}", "threshold": 2 * k} for k in range(1, rounds + 1)]},
        world,
    )
    affiliates = await asyncio.gather(
        *(
            stage.api("POST", "/v1/affiliates", {"program_id": program["id"], "external_id": f"racer-{i}"}, world)
            for i in range(n)
        )
    )
    pairs, a, b = [], 0, 0
    for aff in affiliates:
        left, a = code_on(stage.keys, 0, "ra", a)
        right, b = code_on(stage.keys, 1, "rb", b)
        pairs.append((left, right))
        for code in (left, right):
            await stage.api(
                "POST",
                "/v1/links",
                {"affiliate_id": aff["id"], "code": code, "url": f"https://shop.test/{code}"},
                world,
            )
    stage.start_worker()
    stage.start_worker()
    await stage.groups_ready()

    problems: list[str] = []
    async with stage.load(world, rate=0) as load:
        for k in range(1, rounds + 1):
            await asyncio.gather(*(load.send("convert", code) for pair in pairs for code in pair))
            settled, undrained = await stage.check.wait_drained(time.monotonic(), plan.drain_timeout_s)
            assert settled is not None, f"round {k} never drained: {undrained}"
            missed = await stage.check.milestone_problems()
            if missed:
                problems.append(f"round {k} (threshold {2 * k}): {len(missed)} of {n} affiliates wrong: {missed[:2]}")
        fault_end = await stage.fault_over()
    reached = await stage.check.fetchval("SELECT count(*) FROM affiliate_milestones")
    print(f"\nmilestones reached: {reached} of {rounds * n}")
    await stage.finish(
        f"milestone race, {n} affiliates x {rounds} rounds",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=problems,
    )
