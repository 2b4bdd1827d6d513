"""Bounded Redis: the trim keeps each partition within its share of REFSTREAM_STREAM_MAX_BYTES
once every group (the archive's included) has acked, holds back for the group that has not
(and status names it), and the archive keeps every entry; status and the worker warn when
Redis nears its maxmemory; REFSTREAM_RETENTION_S still sets the retention."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.archive.archiver import GROUP as ARCHIVE
from workers.archive.archiver import Archiver
from workers.archive.store import open_store
from workers.consumer import trim
from workers.host.worker import drain
from workers.ops import status

from ._redis import PrivateRedis
from .test_archive import archived, assert_exactly_once, read_archive, run_archiver, stream_entries
from .test_replay import T0, append, history, make_links

BUDGET = 96 * 1024  # all four partitions together: 24 KiB each, about 60 entries
YEARS = 10 * 365 * 86400  # a retention that keeps everything: the memory budget alone trims


async def stream_bytes(redis: Any, keys: Keys) -> list[int]:
    return [await trim.memory_usage(redis, s) for s in keys.streams]


async def test_the_memory_budget_bounds_redis_and_the_archive_keeps_everything(
    settings: Settings, redis: Any, keys: Keys, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = archived(settings, tmp_path, stream_max_bytes=BUDGET)
    codes = await make_links(pg, redis, keys, 4)
    await Archiver(settings, redis, open_store(settings), name="a").ensure_groups()  # the group, before any entry
    events = sorted(history(codes, 2400, random.Random(2), hours=1), key=lambda e: e.received_at_ms)
    everything: dict[tuple[int, str], dict[bytes, bytes]] = {}
    after_trim = []
    for round_ in range(4):  # four fills, each past the budget: the trim holds Redis at it
        added = await append(redis, keys, events[round_ * 600 : (round_ + 1) * 600])
        everything.update(await stream_entries(redis, keys))
        assert sum(await stream_bytes(redis, keys)) > BUDGET
        await drain(settings)
        # the archive has not read this round yet: the trim keeps all of it, and says who holds it
        await trim.trim(redis, keys, YEARS, BUDGET, exact=True)
        kept = await stream_entries(redis, keys)
        part = {stream: p for p, stream in enumerate(keys.streams)}
        assert [i for stream, ids in added.items() for i in ids if (part[stream], i) not in kept] == []
        snap = await status.snapshot(redis, None, keys, status.Thresholds(), retention_s=YEARS, max_bytes=BUDGET)
        assert {p.trim_held_by for p in snap.partitions} == {ARCHIVE}
        assert all(p.trim_held_entries > 0 and p.memory_bytes > 0 for p in snap.partitions)

        await run_archiver(settings, redis)
        await trim.trim(redis, keys, YEARS, BUDGET, exact=True)
        used = await stream_bytes(redis, keys)
        after_trim.append(sum(used))
        # within its share per partition (MEMORY USAGE is sampled: a node's worth of slack)
        assert max(used) <= BUDGET // keys.partitions * 1.25, used
        snap = await status.snapshot(redis, None, keys, status.Thresholds(), retention_s=YEARS, max_bytes=BUDGET)
        assert {p.trim_held_by for p in snap.partitions} == {None}
    assert max(after_trim) <= 1.25 * min(after_trim)  # flat across the cycles, not growing
    _, lines = await read_archive(open_store(settings), keys.prefix)
    assert_exactly_once(lines, everything)  # trimmed from Redis, every one of them archived


async def test_retention_trims_only_what_every_group_acked(settings: Settings, redis: Any, keys: Keys) -> None:
    await append(redis, keys, history({"C": "00000000-0000-0000-0000-000000000001"}, 300, random.Random(4), hours=2))
    stream = keys.stream_for("C")
    await redis.xgroup_create(stream, "workers", id="0")
    await redis.xgroup_create(stream, ARCHIVE, id="0")
    half = (await redis.xrange(stream, count=150))[-1][0]
    await redis.xreadgroup("workers", "w", {stream: ">"})  # read, not acked
    await redis.xreadgroup(ARCHIVE, "a", {stream: ">"}, count=150)
    ids = [sid for sid, _ in await redis.xrange(stream, max=half)]
    await redis.xack(stream, ARCHIVE, *ids)
    now = T0 + 3 * 3600_000
    assert await trim.trim(redis, keys, 0, now_ms=now, exact=True) == {}  # the workers hold everything
    pending = [sid for sid, _ in await redis.xrange(stream)]
    await redis.xack(stream, "workers", *pending)
    removed = await trim.trim(redis, keys, 0, now_ms=now, exact=True)
    assert removed == {stream: 150}  # down to what the archive still needs
    # with a retention of an hour the cut is an hour before now, not the groups' need
    await redis.xreadgroup(ARCHIVE, "a", {stream: ">"})
    await redis.xack(stream, ARCHIVE, *pending)
    kept = await redis.xlen(stream)
    await trim.trim(redis, keys, 3600 * 2, now_ms=now, exact=True)
    first = (await redis.xrange(stream, count=1))[0][0].decode()
    assert int(first.split("-")[0]) >= now - 2 * 3600_000 and await redis.xlen(stream) < kept


def test_retention_settings_and_their_former_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().stream_retention_s == 3600
    monkeypatch.setenv("REFSTREAM_RETENTION_S", "604800")
    assert Settings().stream_retention_s == 604800
    monkeypatch.delenv("REFSTREAM_RETENTION_S")
    monkeypatch.setenv("REFSTREAM_STREAM_RETENTION_S", "30m")
    monkeypatch.setenv("REFSTREAM_STREAM_MAX_BYTES", "64mb")
    assert (Settings().stream_retention_s, Settings().stream_max_bytes) == (1800, 64 << 20)
    for good in ("file://.refstream-archive", "/var/lib/archive", "s3://bucket/prefix"):
        assert Settings(archive_url=good).archive_url == good
    for bad in ("gs://bucket", "s3://", "ftp://x"):
        with pytest.raises(ValueError, match="s3://bucket"):
            Settings(archive_url=bad)


async def test_status_and_the_worker_warn_before_redis_is_full(
    private_redis: PrivateRedis, settings: Settings, tmp_path: Path
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await _ready(client)
        keys = Keys(settings.stream_prefix, settings.partitions)
        snap = await status.snapshot(client, None, keys, status.Thresholds())
        assert snap.memory is not None and snap.memory.max == 0 and not snap.memory.near_limit
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", str(int(used / 0.9)))  # our own server: 90 % full
        snap = await status.snapshot(client, None, keys, status.Thresholds())
        assert not snap.healthy and [b.check for b in snap.breaches] == ["memory"]
        with capture_logs() as logs:
            mem = await trim.warn_memory(client, 0.8)
        assert mem.near_limit and [e["event"] for e in logs] == ["redis.memory_high"]
        with capture_logs() as logs:
            await trim.warn_memory(client, 0.95)
        assert logs == []
    finally:
        await client.aclose()


async def _ready(client: Any) -> None:
    from .conftest import wait_for

    async def pong() -> bool:
        try:
            return bool(await client.ping())
        except OSError:
            return False
        except Exception:
            return False

    await wait_for(pong, timeout=10, what="the private redis")
