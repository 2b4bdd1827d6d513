"""A partition count changed by ``REFSTREAM_PARTITIONS`` at a restart (issue 64, 9): the count
kept in Redis wins over the variable, with one warning line naming ``refstream partitions
set``; the first process keeps its variable as the layout where none is kept, and streams it
finds past it (left by an older build that followed the variable) are read until empty, then
retired; ``refstream status`` lists every partition that has a key in Redis."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from ingest.contract import layout
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from workers.ops import status

from ._procs import env_for, run_command


async def test_the_count_kept_in_redis_wins_over_a_changed_variable_said_once(
    redis: aioredis.Redis, settings: Settings
) -> None:
    first = layout.Watch(redis, Keys(settings.stream_prefix, 4), 4)
    assert (await first.read()).count == 4
    assert layout.Layout.decode(await redis.get(Keys(settings.stream_prefix, 4).layout), 4).count == 4  # kept

    eight = Keys(settings.stream_prefix, 8)
    restarted = layout.Watch(redis, eight, 8)  # a process restarted with REFSTREAM_PARTITIONS=8
    with capture_logs() as logs:
        for _ in range(3):
            read = await restarted.read()
    assert (read.count, read.span, eight.partitions, len(eight.streams)) == (4, 4, 4, 4)
    said = [e for e in logs if e["log_level"] == "warning"]
    assert len(said) == 1 and said[0]["event"] == "layout.variable_ignored", logs
    assert "refstream partitions set 8" in said[0]["hint"]
    # the variable back to the count: nothing to say
    with capture_logs() as logs:
        await layout.Watch(redis, Keys(settings.stream_prefix, 4), 4).read()
    assert not [e for e in logs if e["log_level"] == "warning"], logs


async def test_streams_left_past_the_variable_are_read_until_empty_then_retired(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """What an older build left after the variable went 4 -> 8 -> 4: eight streams, no layout."""
    keys = Keys(settings.stream_prefix, 8)
    for p in range(8):
        await layout.ensure(redis, keys, p, (GROUP,))
        await redis.xadd(keys.stream(p), {"e": "acked"})
    watch = layout.Watch(redis, Keys(settings.stream_prefix, 4), 4)
    kept = await watch.read()
    assert (kept.count, kept.span, list(kept.retiring)) == (4, 8, [4, 5, 6, 7])
    for p in range(4, 8):  # the workers read them and trim what every group acked
        await redis.xtrim(keys.stream(p), maxlen=0)
    assert sorted(await layout.retire(redis, keys, 4, grace_ms=0)) == [4, 5, 6, 7]
    after = await layout.load(redis, keys, 4)
    assert (after.count, after.span) == (4, 4)
    assert not await redis.exists(*(keys.stream(p) for p in range(4, 8)))


async def _status(settings: Settings) -> tuple[int, dict[str, Any]]:
    code, out, err = await run_command("status", "--json", env=env_for(settings))
    assert code in (0, 3), err
    return code, orjson.loads(out)


async def test_status_lists_every_partition_key_in_redis(redis: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.stream_prefix, 4)
    for p in range(4):
        await layout.ensure(redis, keys, p, (GROUP,))
    await layout.Watch(redis, keys, 4).read()  # 4 kept
    # partition 9 retired, partition 6 a stream nobody reads, holding two acked entries
    await redis.set(keys.retired(9), "1")
    await layout.ensure(redis, keys, 6, (GROUP,))
    for _ in range(2):
        await redis.xadd(keys.stream(6), {"e": "x"})
    snap = await status.snapshot(redis, None, keys, status.Thresholds())
    assert [p.partition for p in snap.partitions] == [0, 1, 2, 3]
    shown = {p.partition: p for p in snap.unread}
    assert sorted(shown) == [6, 9]
    assert (shown[6].length, shown[6].retired, [g.name for g in shown[6].groups]) == (2, False, [GROUP])
    assert (shown[9].length, shown[9].retired) == (0, True)
    assert [b.check for b in snap.breaches] == ["unread"] and not snap.healthy

    code, out = await _status(settings)  # and the command says so
    assert code == 3
    assert [(p["partition"], p["length"], p["retired"]) for p in out["unread"]] == [(6, 2, False), (9, 0, True)]
    await redis.delete(keys.stream(6))
    code, out = await _status(settings)
    assert [p["partition"] for p in out["unread"]] == [9]
