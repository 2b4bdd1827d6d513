"""The consumer-group member loop (workers/group) under a full Redis, on a Redis of the
test's own: a group Redis will not create is waited for, the member shown as blocked by
``redis_oom`` meanwhile (its state and one log line), and made once Redis takes writes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.archive.archiver import GROUP, Archiver
from workers.archive.store import open_store
from workers.group import presence
from workers.group.claims import Claims

from .conftest import wait_for
from .test_archive import archived, read_archive

FILLER = "test:filler"  # not under the test's prefix: the test's own key


async def fill(redis: aioredis.Redis) -> None:
    """APPEND to the filler until Redis refuses, in ever smaller pieces."""
    for chunk in (64 * 1024, 1024):
        while True:
            try:
                await redis.append(FILLER, b"\0" * chunk)
            except ResponseError as exc:
                assert "maxmemory" in str(exc), exc
                break


async def test_a_group_a_full_redis_will_not_create_is_waited_for_and_shown(
    private_fault_redis, settings: Settings, tmp_path: Path
) -> None:
    server = await private_fault_redis("--maxmemory", str(4 << 20), "--maxmemory-policy", "noeviction")
    settings = archived(settings, tmp_path, redis_url=server.url, partitions=1)
    keys = Keys(settings.stream_prefix, 1)
    redis = aioredis.Redis.from_url(server.url)
    try:
        await redis.xadd(keys.stream(0), {b"e": b"before the group"})
        await fill(redis)
        archiver = Archiver(settings, redis, open_store(settings), name="a")
        with capture_logs() as logs:
            run = asyncio.create_task(archiver.run())
            try:
                await wait_for(lambda: _blocked(archiver), what="the archiver to show it waits for its group")
                assert archiver.member.state()["reasons"] == ["redis_oom"]
                assert [(e["reason"], e["stream"]) for e in logs if e["event"] == "group.waiting"] == [
                    ("redis_oom", keys.stream(0))
                ]
                assert not [g for g in await redis.xinfo_groups(keys.stream(0)) if g["name"] == GROUP.encode()]

                await redis.delete(FILLER)  # Redis takes writes again: the group is made, the entry archived

                async def shown_running() -> bool:
                    rows = {w.consumer: w.state for w in await presence.read(redis, keys, time.time())}
                    return archiver.totals.entries == 1 and rows.get(archiver.presence_name) == "running"

                await wait_for(shown_running, what="the archiver to archive and show itself running")
            finally:
                archiver.stop()
                await asyncio.wait_for(run, 30)
        assert any(e["event"] == "group.ready" for e in logs)
        assert len((await read_archive(open_store(settings), keys.prefix))[1]) == 1
    finally:
        await redis.aclose()


async def _blocked(archiver: Archiver) -> bool:
    return bool(archiver.member.state()["state"] == "blocked")


async def test_hold_keeps_only_its_own_entries_and_no_reclaim_takes_them_after(
    private_fault_redis, settings: Settings
) -> None:
    """``Claims.hold``: of a segment's entries, those pending in this member come back with
    their idle time reset in the same script, so another member's reclaim right after takes
    none of them (found by the generative test, seed 1672224041: at a Redis stall's thaw a
    reclaim ran between an archiver's look at its claims and its upload, and both archivers
    wrote the entries); an entry another member took, or one pending nowhere, is not held.
    On a full Redis too: the script calls no deny-OOM command."""
    server = await private_fault_redis("--maxmemory", str(4 << 20), "--maxmemory-policy", "noeviction")
    redis = aioredis.Redis.from_url(server.url)
    stream = "test:hold"
    try:
        ids = [(await redis.xadd(stream, {b"e": b"%d" % i})).decode() for i in range(6)]
        await redis.xgroup_create(stream, "g", id="0")
        await redis.xreadgroup("g", "a", {stream: ">"}, count=4)  # a holds 0-3
        await redis.xreadgroup("g", "b", {stream: ">"}, count=1)  # b holds 4; 5 is pending nowhere
        await redis.xclaim(stream, "g", "a", 0, ids[:4], idle=60_000, justid=True)  # a stalled a minute
        await fill(redis)
        a, b = Claims(redis, "g", "a", 30_000), Claims(redis, "g", "b", 30_000)
        assert await a.hold(stream, ids) == set(ids[:4])
        assert await b.reclaim(stream, 100) == 0  # idle reset: nothing of a's is b's to take
        assert await a.keep(stream, ids) == set(ids[4:])  # not a's: dropped from what it holds
        rows = await redis.xpending_range(stream, "g", "-", "+", 10)
        assert {(r["message_id"].decode(), r["consumer"].decode()) for r in rows} == {
            *((i, "a") for i in ids[:4]),
            (ids[4], "b"),
        }
    finally:
        await redis.aclose()
