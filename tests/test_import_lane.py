"""The import lane's gate, on a scripted live backlog: what it decides from the ages it
reads (how those are read from Redis is tested in test_import.py, on a real Redis).

The floor is a high percentile of the lag live work keeps while the import rests, not the
least of it, and a lag that crosses the bound for a read is noise, not a reason to halve
the import's share (on a loaded machine that kept the share at its least: 100,000 rows
beside 500 clicks/s did not finish in 26 minutes)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import pytest

from ingest.contract.keys import Keys
from workers.ops import import_lane
from workers.ops.import_lane import FLOOR_QUANTILE, MIN_SHARE, SHARE_STEP, Gate, LiveBacklog, Waiting, quantile


class Scripted(LiveBacklog):
    """Live work's waiting as ``age(read number)`` says, with ``entries`` waiting."""

    def __init__(self, age: Callable[[int], int], entries: int = 5) -> None:
        super().__init__(None, Keys("unused", 1), 1)
        self.age, self.entries_waiting, self.reads = age, entries, 0
        self.ages: list[int] = []  # what each read answered

    async def waiting(self) -> Waiting:
        self.reads += 1
        self.ages.append(self.age(self.reads))
        return Waiting(self.entries_waiting, self.ages[-1])


def test_quantile_is_the_nearest_rank() -> None:
    assert quantile([5], 0.9) == 5
    assert quantile(list(range(1, 11)), 0.9) == 9
    assert quantile(list(range(1, 11)), 1.0) == 10
    assert quantile([30, 10, 20], 0.5) == 20


async def test_a_noisy_floor_is_a_high_percentile_of_the_rest_and_does_not_halve_the_share() -> None:
    """Live work's own lag jumping between 40 and 300 ms (a busy machine: never under the
    20 ms bound): the wait rests ``SETTLE_S``, then takes the 90th percentile of what it read
    as the floor (the least, 40, would hold the next batches back on most reads); the share
    stays where it was."""
    rng = random.Random(4)
    noise = [rng.choice((40, 40, 40, 90, 90, 150, 300)) for _ in range(10_000)]
    backlog = Scripted(lambda n: noise[n % len(noise)])
    gate = Gate(backlog, yield_backlog=1000, yield_lag_ms=20, share=0.5)
    behind, waited = await gate.give_way(asyncio.Event())
    assert behind and waited >= import_lane.SETTLE_S
    assert gate.floor_ms == quantile(backlog.ages, FLOOR_QUANTILE) and gate.floor_ms >= 150, gate.floor_ms
    assert gate.lag_limit_ms() == gate.floor_ms + 20
    assert gate.share == 0.5  # a wait that measured the floor is not live work hurt by the import
    assert not gate.held_back(Waiting(5, 150))  # the noise now passes


async def test_a_blip_over_the_bound_holds_one_batch_back_without_halving() -> None:
    ages = itertools.chain([80], itertools.repeat(0))  # one read over 20 ms, then none waits
    gate = Gate(Scripted(lambda n: next(ages)), yield_backlog=1000, yield_lag_ms=20, share=0.5)
    behind, waited = await gate.give_way(asyncio.Event())
    assert behind and waited < import_lane.HALVE_AFTER_S
    assert gate.share == 0.5
    behind, _ = await gate.give_way(asyncio.Event())
    assert not behind and gate.share == pytest.approx(0.5)  # at its ceiling: no step above it


async def test_a_lag_that_keeps_growing_is_waited_out_and_halves_the_share() -> None:
    """Workers stopped: the oldest entry ages with the clock. No floor is ever measured
    (the lag never comes back within ``yield_lag_ms`` of its least); once the workers take
    it the import goes on, its share halved."""
    loop = asyncio.get_running_loop()
    started, resumed = loop.time(), asyncio.Event()

    def age(n: int) -> int:
        if resumed.is_set():
            return 0
        return 200 + int((loop.time() - started) * 1000)

    gate = Gate(Scripted(age), yield_backlog=1000, yield_lag_ms=20, share=0.4)
    task = asyncio.create_task(gate.give_way(asyncio.Event()))
    while loop.time() - started < import_lane.SETTLE_S + 0.5:  # past the rest that would measure a floor
        assert not task.done()
        await asyncio.sleep(0.05)  # lets the gate read the growing lag; the assertion is what is awaited
    resumed.set()
    behind, waited = await asyncio.wait_for(task, 5)
    assert behind and waited >= import_lane.SETTLE_S and gate.floor_ms == 0
    assert gate.share == pytest.approx(0.2)


async def test_a_backlog_over_its_bound_halves_whatever_the_lag() -> None:
    waiting = Scripted(lambda n: 0, entries=5000)
    gate = Gate(waiting, yield_backlog=1000, yield_lag_ms=20, share=0.1)
    task = asyncio.create_task(gate.give_way(asyncio.Event()))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < import_lane.HALVE_AFTER_S + 0.1:
        assert not task.done()
        await asyncio.sleep(0.05)  # the gate is waiting on the backlog's size
    waiting.entries_waiting = 0
    await asyncio.wait_for(task, 5)
    assert gate.share == pytest.approx(max(MIN_SHARE, 0.05))
    await gate.give_way(asyncio.Event())
    assert gate.share == pytest.approx(0.05 + SHARE_STEP)
