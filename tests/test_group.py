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

from ingest.keys import Keys
from ingest.settings import Settings
from workers import presence
from workers.archive import GROUP, Archiver
from workers.archive_store import open_store

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
