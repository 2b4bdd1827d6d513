"""The partition count changed the way a deployment's config changes it: ``REFSTREAM_PARTITIONS``
4 → 8 → 4 by rolling restarts under load (a new edge beside the old one, the load moved to
it, the old one stopped; each worker replaced by one with the new variable), never
``refstream partitions set``. The count kept in Redis wins (docs/operations.md, "Partition
count"): the restarted processes say so in one warning line naming ``refstream partitions
set`` and go on writing and reading 4 partitions. At the end: every 2xx'd event stored
exactly once, nothing pending, no stream key that no worker reads (acked entries there would
never be trimmed), and ``refstream status`` lists every partition key in Redis."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest

from ingest.contract import layout

from ._load import Load
from ._plan import Plan
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

# the workers trim every second and keep nothing acked
ENV = {"REFSTREAM_STREAM_RETENTION_S": "1", "REFSTREAM_TRIM_EVERY_S": "1"}


def _edges(stage: Stage) -> list[subprocess.Popen[bytes]]:
    return [p for p in stage.procs.running if "serve" in p.args and p.poll() is None]  # type: ignore[operator]


async def _roll(stage: Stage, load: Load, partitions: int) -> None:
    """Every process restarted with ``REFSTREAM_PARTITIONS=partitions``, one at a time, the
    load going on: the edge first, then each worker."""
    env = {**ENV, "REFSTREAM_PARTITIONS": str(partitions)}
    (old,) = _edges(stage)
    load.base = await stage.start_edge(**env)  # the new edge takes the load, then the old one stops
    stage.killed.add(old.pid)
    old.send_signal(signal.SIGTERM)
    await asyncio.to_thread(old.wait, 60)
    for name in [n for n in stage.alive()]:
        new = stage.start_worker(**env)
        await _started(stage, new)  # as a deployment waits for a replacement's readiness
        await stage.kill_worker(name, signal.SIGTERM, timeout=60)


async def _started(stage: Stage, name: str, within_s: float = 60) -> None:
    """Until worker ``name`` has read the layout and started reading (its log says so)."""
    log = sorted(stage.procs.logdir.glob("*-work.log"))[-1]
    deadline = asyncio.get_running_loop().time() + within_s
    while f'"consumer":"{name}"' not in (text := log.read_text(errors="replace")) or "consumer.start" not in text:
        assert asyncio.get_running_loop().time() < deadline, f"worker {name} did not start: {text[-2000:]}"
        await asyncio.sleep(0.1)


async def test_partition_count_changed_by_the_variable_at_rolling_restarts(stage: Stage, plan: Plan) -> None:
    world = await stage.prepare(workers=2, codes=None, edge_env=ENV, **ENV)
    await stage.groups_ready()
    async with stage.load(world) as load:
        await stage.storing()
        await asyncio.sleep(plan.warmup_s)
        await _roll(stage, load, 8)
        await asyncio.sleep(plan.warmup_s)  # "eight" partitions under load for a while
        await _roll(stage, load, 4)
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    fig = await stage.finish(
        "partition count 4 -> 8 -> 4 by REFSTREAM_PARTITIONS at rolling restarts, under load",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
    )
    # after the drain: the count kept, said by each process started with another, and every
    # stream key in Redis one that the workers read and trim, listed by refstream status
    problems = []
    kept = await layout.load(stage.redis, stage.keys, 4)
    if (kept.count, kept.span) != (4, 4):
        problems.append(f"the layout kept is {kept.describe()}, not 4 partitions")
    files = sorted(stage.procs.logdir.glob("*.log"))
    logs = [path.read_text(errors="replace") for path in files]
    said = {path.name: text.count("layout.variable_ignored") for path, text in zip(files, logs, strict=True)}
    if sorted(n for n in said.values() if n) != [1, 1, 1]:  # the edge and the two workers started with 8, once each
        problems.append(f"processes said their REFSTREAM_PARTITIONS was not the count kept: {said}")
    if not all("refstream partitions set 8" in text for text in logs if "layout.variable_ignored" in text):
        problems.append("the warning does not name `refstream partitions set`")
    found = await layout.existing(stage.redis, stage.keys, range(layout.MOST))
    streams = sorted(p for p, (stream, _, _) in found.items() if stream)
    if unread := [p for p in streams if p >= kept.span]:
        lengths = [await stage.redis.xlen(stage.keys.stream(p)) for p in unread]
        problems.append(f"streams {unread} ({lengths} entries) are read by no worker: never trimmed")
    status = await stage.cli("status", **ENV)
    listed = {p["partition"] for p in status["partitions"]} | {p["partition"] for p in status.get("unread", ())}
    if missing := sorted(set(found) - listed):
        problems.append(f"refstream status does not list partitions {missing}, whose keys are in Redis")
    assert not problems, f"{fig.scenario}: " + "; ".join(problems)
