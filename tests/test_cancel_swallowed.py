"""A loop that waits out Redis errors still stops when it is cancelled, even when the cancel
lands inside a client call that turns it into its own timeout error (redis-py's reads do,
as their timeout fires): the layout watch went on waiting for ever, and the edge's close
with it (CI, tests/test_stalls.py's teardown under a stalled Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout

from ingest.contract import layout
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings


async def test_the_layout_watch_stops_when_a_client_turns_its_cancel_into_a_timeout(
    redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reading = asyncio.Event()

    async def load_as_a_stalled_redis(*args: object, **kw: object) -> layout.Layout:
        reading.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from 127.0.0.1:6379") from None  # as redis-py's read does
        raise AssertionError("unreachable")

    monkeypatch.setattr(layout, "load", load_as_a_stalled_redis)
    watch = layout.Watch(redis, Keys(settings.stream_prefix, 4), 4)
    watch.start()
    await asyncio.wait_for(reading.wait(), 5)
    closing = asyncio.create_task(watch.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    assert closing in done, "the watch went on after its cancel (read as a Redis timeout)"
