"""Part (r), outside the default set (``--only r``): the archiver against the worker on the
same entries, and Redis's bytes per event across retention cycles.

1. N pre-filled mixed events; ``refstream work --drain`` and then ``refstream archive
   --drain`` read the same partitions (each its own group): events/s of each, the ratio,
   and the archive's compressed bytes per event.
2. Cycles of fill, drain by both groups, and trim under a memory budget
   (``REFSTREAM_STREAM_MAX_BYTES``, a third of one cycle's entries): the streams' memory
   after each trim, per entry kept and in total. Flat across cycles is the goal: Redis is a
   buffer, the archive keeps the rest.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from ingest.contract import wire
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from workers.archive.archiver import GROUP as ARCHIVE
from workers.consumer import trim

from .context import Ctx
from .pipeline_parts import _until
from .world import backlog, copy_database, fill, mixed

CYCLES = 3


async def _group_done(ctx: Ctx, keys: Keys, group: str) -> bool:
    for stream in keys.streams:
        info = await ctx.redis.xinfo_stream(stream)
        for g in await ctx.redis.xinfo_groups(stream):
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == group and (g["pending"] or g["last-delivered-id"] != info["last-generated-id"]):
                return False
    return True


async def _drain(ctx: Ctx, name: str, keys: Keys, command: str, group: str, **env: str) -> float:
    """Run ``refstream <command> --drain`` on ``keys``; seconds from its first read to done."""
    proc = ctx.procs.refstream(name, command, "--drain", REFSTREAM_STREAM_PREFIX=keys.prefix, **env)

    async def started() -> bool:
        for stream in keys.streams:
            for g in await ctx.redis.xinfo_groups(stream):
                if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == group and (
                    g["pending"] or g.get("entries-read")
                ):
                    return True
        return False

    t0 = await _until(f"{command} to read", started, 120, every=0.01)
    if proc.wait(600) != 0:
        raise RuntimeError(f"{command} --drain failed: {ctx.procs.tail(name)}")
    return time.monotonic() - t0


async def _append(ctx: Ctx, keys: Keys, envelopes: list[Envelope]) -> None:
    """``fill`` without creating the groups again."""
    for start in range(0, len(envelopes), 5000):
        pipe = ctx.redis.pipeline(transaction=False)
        for e in envelopes[start : start + 5000]:
            pipe.xadd(keys.stream_for(e.payload["code"]), wire.to_entry_dict(e))  # type: ignore[arg-type]
        await pipe.execute()


async def part_r(ctx: Ctx) -> None:
    n = ctx.opts.drain_events
    keys = ctx.keys("r")
    archive_dir = Path(ctx.procs.logdir).parent / f"archive-r{ctx.run}"
    env = {"REFSTREAM_ARCHIVE_URL": f"file://{archive_dir}"}
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_h")
    env["DATABASE_URL"] = ctx.world.url(db)
    for stream in keys.streams:
        await ctx.redis.xgroup_create(stream, ARCHIVE, id="0", mkstream=True)
    await fill(ctx.redis, keys, mixed(ctx.world, n, random.Random(ctx.run)))
    worker_s = await _drain(ctx, "worker-drain-h", keys, "work", "workers", **env)
    archive_s = await _drain(ctx, "archive-drain-h", keys, "archive", ARCHIVE, **env)
    ctx.note("r.events", n)
    ctx.note("r.worker_events_per_s", n / worker_s)
    ctx.note("r.archive_events_per_s", n / archive_s)
    ctx.note("r.archive_ratio_worker", worker_s / archive_s)
    size = sum(p.stat().st_size for p in archive_dir.rglob("*.zst"))
    ctx.note("r.archive_bytes_per_event", size / n)

    # retention cycles under a memory budget: a third of one cycle's entries
    per_cycle = max(1000, n // CYCLES)
    used = sum([await trim.memory_usage(ctx.redis, s) for s in keys.streams])
    length = sum([await ctx.redis.xlen(s) for s in keys.streams])
    budget = int(used / max(1, length) * per_cycle / 3)
    after = []
    for cycle in range(CYCLES):
        await _append(ctx, keys, mixed(ctx.world, per_cycle, random.Random(1000 + cycle)))
        await _drain(ctx, f"worker-h{cycle}", keys, "work", "workers", **env)
        await _drain(ctx, f"archive-h{cycle}", keys, "archive", ARCHIVE, **env)
        await trim.trim(ctx.redis, keys, 3600, budget)
        mem = sum([await trim.memory_usage(ctx.redis, s) for s in keys.streams])
        after.append(mem)
        ctx.note(f"r.redis_bytes_after_cycle_{cycle + 1}", mem)
    left, _ = await backlog(ctx.redis, keys)
    if left:
        raise RuntimeError(f"(r) {left} entries left undrained")
    ctx.note("r.redis_budget_bytes", budget)
    ctx.note("r.redis_bytes_flatness", max(after) / max(1, min(after)))
