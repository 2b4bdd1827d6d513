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
from workers.group import Chore, Entry, Member, Part


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


class _Idle(Part):
    """A part that never holds anything: the member's loops without a pipeline."""

    def room(self) -> int:
        return 10

    def take(self, entries: list[Entry], again: bool) -> None:
        assert not entries

    def held(self) -> list[str]:
        return []

    async def settle(self) -> None:
        raise AssertionError("holds nothing")


async def test_a_member_stops_when_its_housekeeping_loses_the_cancel(redis: aioredis.Redis, settings: Settings) -> None:
    """redis-py 5 sends each command through ``asyncio.wait_for``, which on Python 3.11 returns
    the inner result when the cancel lands the loop iteration after the send finished: the
    cancel is lost, ``Task.cancelling()`` still counts it. The member's housekeeping, ended
    by a cancel alone, then ran on for ever, the member's stop waited on it, and the worker
    neither logged ``consumer.stop`` nor exited after SIGTERM (once in nine rounds under
    load; tests/test_sigterm_drain.py). A chore that loses its cancel the same way stands in
    for the race, which a real Redis call hits only now and then."""
    in_chore, lost = asyncio.Event(), asyncio.Event()

    async def loses_its_cancel() -> None:
        in_chore.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if lost.is_set():
                raise  # only the first: the test can end a member that never stopped
            lost.set()  # returns as redis-py's wait_for does: cancelling() stays 1, nothing raised

    member = Member(
        settings,
        redis,
        group="g",
        name="m",
        part=lambda p, stream: _Idle(),
        role="test",
        chores=[Chore("lossy", 0.01, loses_its_cancel)],
    )
    running = asyncio.create_task(member.run())
    await asyncio.wait_for(in_chore.wait(), 10)
    member.stop()
    done, _ = await asyncio.wait({running}, timeout=10)
    if running not in done:
        running.cancel()  # a second cancel, which the chore does not lose
        await asyncio.wait({running}, timeout=10)
        pytest.fail("the member's stop waited for ever on its housekeeping, its cancel lost")
    assert lost.is_set(), "the chore was never cancelled"
    running.result()


async def test_the_consoles_sampler_stops_when_a_client_turns_its_cancel_into_a_timeout(
    redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console's sampling loop counts a Redis timeout as Redis unreadable and samples on:
    a cancel turned into that timeout must still end it (a console's close hung on it)."""
    from refstream.console.ring import Sampler

    reading = asyncio.Event()

    async def time_as_a_stalled_redis() -> tuple[int, int]:
        reading.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from 127.0.0.1:6379") from None  # as redis-py's read does
        raise AssertionError("unreachable")

    monkeypatch.setattr(redis, "time", time_as_a_stalled_redis)

    class NoPostgres:
        async def fetch(self, *args: object, **kw: object) -> list[object]:
            raise OSError("no postgres in this test")

    sampler = Sampler(redis, NoPostgres(), Keys(settings.stream_prefix, 4), [])
    sampling = asyncio.create_task(sampler.run())
    await asyncio.wait_for(reading.wait(), 5)
    sampling.cancel()
    done, _ = await asyncio.wait({sampling}, timeout=5)
    assert sampling in done, "the sampler went on after its cancel (read as a Redis timeout)"
