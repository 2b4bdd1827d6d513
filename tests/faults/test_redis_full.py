"""Redis full under ``noeviction``: a filler key of the test's own takes the memory while
workers run. Workers keep running (an outage, never a reason to exit); the edge spools or
answers 503, never 2xx for an event it did not keep; once the filler is gone, everything
accepted is stored once. An archiver started while Redis is full (its group made by an
earlier run) archives and acks what the trim waits for, so the trim frees Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ingest.contract.keys import GROUP
from workers.archive.archiver import GROUP as ARCHIVE
from workers.archive.store import LocalStore
from workers.ops import status

from ..conftest import wait_for
from ._plan import Plan
from ._servers import FaultRedis
from ._stage import Stage
from .test_archive import archive_drained, archive_lines

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


async def fill(admin: aioredis.Redis) -> None:
    """Top up until even a stream entry is refused."""
    await top_up(admin)
    for _ in range(20):
        try:
            await admin.xadd("faults:probe", {"x": "1"})
            await admin.delete("faults:probe")
            await top_up(admin)
        except ResponseError as exc:
            assert "maxmemory" in str(exc), exc
            return
    raise AssertionError("Redis could not be filled")


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
            await fill(admin)  # full: even a stream entry is refused
            statuses_before = load.record.statuses.copy()
            top_ups = await hold_full(admin, time.monotonic() + plan.redis_full_s)  # the fault, held
            during = load.record.statuses - statuses_before
            await admin.delete(FILLER)
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        print(f"\nanswers while Redis was full: {dict(during)}; filler topped up {top_ups} times")
        await stage.finish(
            f"redis full {plan.redis_full_s:.0f}s",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
        )
    finally:
        await admin.aclose()


ENTRIES = 6000


async def test_an_archiver_started_while_redis_is_full_frees_it(private_fault_redis, make_stage):
    """The archive group exists (an archiver ran before) and holds the trim back for 6,000
    entries; Redis fills up. XGROUP CREATE is refused now even for a group that exists: an
    archiver started then must archive and ack anyway, so the worker's trim frees Redis,
    and ``refstream status`` lists the archiver."""
    server: FaultRedis = await private_fault_redis("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")
    stage: Stage = make_stage(server.url)
    keys, redis = stage.keys, stage.redis
    await stage.cli("migrate")
    pipe = redis.pipeline(transaction=False)
    for i in range(ENTRIES):
        pipe.xadd(keys.stream(i % keys.partitions), {b"e": b"%06d" % i + b"." * 200})
    await pipe.execute()
    for stream in keys.streams:
        await redis.xgroup_create(stream, ARCHIVE, id="0")  # nothing archived yet
        await redis.xgroup_create(stream, GROUP, id="$")  # the workers are done with all of it
    stage.start_worker(REFSTREAM_TRIM_EVERY_S="1", REFSTREAM_STREAM_RETENTION_S="0")
    admin = aioredis.Redis.from_url(server.url)
    try:
        await fill(admin)
        store = LocalStore(str(stage.tmp / "archive"))
        stage.procs.start(
            "archive",
            REFSTREAM_CONSUMER_NAME="a1",
            REFSTREAM_ARCHIVE_URL=f"file://{store.root}",
            REFSTREAM_ARCHIVE_SEGMENT_S="1",
        )
        assert await archive_drained(stage, 60), f"nothing archived under a full Redis:\n{stage.log_tail()}"
        lines = await archive_lines(store, keys.prefix)
        assert len(lines) == len({(p, e.id) for p, e in lines}) == ENTRIES

        async def writable() -> bool:  # the trim took what both groups acked: Redis takes writes again
            try:
                await admin.xadd("faults:probe", {"x": "1"})
            except ResponseError:
                return False
            await admin.delete("faults:probe")
            return True

        await wait_for(writable, timeout=60, what="the trim to free Redis")

        async def listed() -> bool:
            snap = await status.snapshot(redis, None, keys, status.Thresholds())
            workers = {w.consumer: w.state for w in snap.workers if not w.stale}
            members = {c.name for p in snap.partitions for g in p.groups if g.name == ARCHIVE for c in g.consumers}
            return workers.get(f"{ARCHIVE}:a1") == "running" and members == {"a1"}

        await wait_for(listed, timeout=30, what="refstream status to list the archiver")
        assert stage.exited_by_themselves() == []
    finally:
        await admin.aclose()
