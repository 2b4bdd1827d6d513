"""The partition count changed live, under load, the way an operator does it: real processes
(``refstream serve``, two ``refstream work``), ``refstream partitions set`` from the command
line. 4 → 8: the edge writes the new partitions without a restart and the workers read
them. Then 8 → 2 with ``--wait``, one worker frozen (SIGSTOP) while it holds entries of a
partition being retired: partitions 2-7 are retired (no new appends; the other worker
reclaims the frozen one's entries, stores and trims them; only then is each deleted). The
load runs throughout. At the end, the
invariants over every partition the layout ever had: every 2xx'd event stored exactly
once, counters equal to their rows, nothing pending."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis.asyncio as aioredis

from ingest.contract.keys import GROUP, Keys

from ..conftest import wait_for
from ._plan import Plan
from ._stage import Stage, codes_covering

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

# the workers trim every second and keep nothing acked: a retired partition empties soon
ENV = {"REFSTREAM_STREAM_RETENTION_S": "1", "REFSTREAM_TRIM_EVERY_S": "1"}
# a frozen worker's entries are reclaimed after 15 s, well after the retire's grace (5 s):
# the retire meets a partition whose only entries are pending, and must wait for them
WORKER_ENV = {**ENV, "REFSTREAM_CLAIM_IDLE_MS": "15000"}


async def _read_by_workers(stage: Stage, partitions: range) -> list[int]:
    """The partitions of ``partitions`` whose workers' group has delivered nothing yet."""
    unread = []
    for p in partitions:
        try:
            groups = await stage.redis.xinfo_groups(stage.keys.stream(p))
        except Exception:
            groups = []  # not made yet
        mine = [g for g in groups if g["name"] == GROUP.encode()]
        if not mine or mine[0]["last-delivered-id"] in (b"0-0", "0-0"):
            unread.append(p)
    return unread


async def _freeze_holding(stage: Stage, name: str, partitions: range, within: float = 30) -> int:
    """SIGSTOP worker ``name`` while it holds (read, not acked) entries of one of
    ``partitions``; that partition."""
    proc = stage.workers[name]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for p in partitions:
            try:
                held = await stage.redis.xpending_range(stage.keys.stream(p), GROUP, "-", "+", 1, consumername=name)
            except aioredis.ResponseError:
                continue
            if not held:
                continue
            proc.send_signal(signal.SIGSTOP)
            try:  # it may have acked them between the look and the signal
                if await stage.redis.xpending_range(stage.keys.stream(p), GROUP, "-", "+", 1, consumername=name):
                    stage.killed.add(proc.pid)
                    return p
            except aioredis.ResponseError:
                pass
            proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.002)
    raise AssertionError(f"{name} held no entries of partitions {partitions.start}-{partitions.stop - 1}")


async def test_partition_count_grown_then_shrunk_under_load(stage: Stage, plan: Plan):
    wide = Keys(stage.settings.stream_prefix, 8)
    world = await stage.prepare(workers=2, codes=codes_covering(wide, per_partition=2), edge_env=ENV, **WORKER_ENV)
    await stage.groups_ready()
    problems: list[str] = []
    async with stage.load(world) as load:
        await stage.storing()
        await asyncio.sleep(plan.warmup_s)
        grown = await stage.cli("partitions", "set", "8", **ENV)
        assert (grown["before"], grown["count"], grown["span"]) == (4, 8, 8), grown

        async def new_ones_read() -> bool:
            return not await _read_by_workers(stage, range(4, 8))

        await wait_for(new_ones_read, timeout=60, what="the edge to write partitions 4-7 and the workers to read them")
        await asyncio.sleep(plan.warmup_s)  # eight partitions under load for a while
        frozen = await _freeze_holding(stage, "w1", range(2, 8))
        try:
            shrunk = await stage.cli("partitions", "set", "2", "--wait", "--timeout", "90", **ENV)
        finally:
            stage.workers["w1"].send_signal(signal.SIGCONT)
        assert (shrunk["count"], shrunk["span"], shrunk["retiring"]) == (2, 2, []), shrunk
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    for p in range(2, 8):
        if await stage.redis.exists(stage.keys.stream(p)):
            problems.append(f"partition {p} retired but its stream is still there")
        if not await stage.redis.exists(stage.keys.retired(p)):
            problems.append(f"partition {p} retired without its mark (a late append could make it again)")
    status = await stage.cli("status", **ENV)
    if [p["partition"] for p in status["partitions"]] != [0, 1]:
        problems.append(f"refstream status shows partitions {[p['partition'] for p in status['partitions']]}")
    await stage.finish(
        f"partition count 4 -> 8 -> 2 under load, w1 frozen holding partition {frozen}",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=problems,
    )
