"""A worker's read of a partition that came back short waits ``REFSTREAM_LINGER_MS`` once for
more to join the batch, while its Postgres writes nothing; 0 never waits; a full read never
waits, nor a read while a transaction is in flight (its batch waits for that one anyway).
Against a real Redis: one entry, then four more 100 ms later. And under a steady load a
partition is read on the member's tick (``REFSTREAM_READ_INTERVAL_MS``), but after a read
that found nothing or a full batch."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import redis.asyncio as aioredis

from ingest.contract.events import Envelope
from ingest.contract.keys import GROUP
from ingest.contract.settings import Settings
from workers.consumer.combine import Combiner
from workers.consumer.consume import LINGER_BELOW, Consumer
from workers.consumer.pipeline import Pipeline
from workers.consumer.store import BatchResult
from workers.group import Entry, Member, Part


class _Reads(Part):
    """The member's reads alone: nothing is held, no batch settles."""

    def room(self) -> int:
        return 100

    def take(self, entries: list[Entry], again: bool) -> None:
        raise AssertionError("the test reads, it never hands a batch over")

    def held(self) -> list[str]:
        return []

    async def settle(self) -> None:
        raise AssertionError("holds nothing")


class _Writes:
    """A pipeline's combiner (a real one) whose writes end when ``done`` is set."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.combiner = Combiner(self._write, 500)

    async def _write(self, envelopes: list[Envelope]) -> BatchResult:
        await self.done.wait()
        return BatchResult(inserted=len(envelopes))


async def _read_while_trickling(
    redis: aioredis.Redis, settings: Settings, count: int = 100, writes: _Writes | None = None
) -> tuple[int, float]:
    """(entries the first read of a fresh partition returned, seconds it took) while one entry
    is appended at once and four more 100 ms later."""
    consumer = Consumer(settings, redis, cast(Pipeline, writes or _Writes()), name="linger-test")
    member: Member = consumer.member
    stream = member.keys.stream(0)
    await redis.delete(stream)  # a fresh partition each time
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    member._backlog[0] = False  # nothing of its own pending: straight to new entries

    async def trickle() -> None:
        await redis.xadd(stream, {"n": "0"})
        await asyncio.sleep(0.1)
        for n in range(1, 5):
            await redis.xadd(stream, {"n": str(n)})

    appending = asyncio.create_task(trickle())
    started = time.monotonic()
    entries, again = await member._read(0, stream, _Reads(), count)
    took = time.monotonic() - started
    await appending
    assert not again
    return len(entries), took


async def test_a_short_read_waits_the_linger_once_and_takes_what_arrived(redis: aioredis.Redis, settings: Settings):
    n, took = await _read_while_trickling(redis, settings.model_copy(update={"linger_ms": 400.0}))
    assert n == 5, n  # the four that came 100 ms later joined the first
    assert took < 2.0  # once: not until the batch fills


async def test_a_linger_of_0_never_waits(redis: aioredis.Redis, settings: Settings):
    consumer = Consumer(settings.model_copy(update={"linger_ms": 0.0}), redis, cast(Pipeline, _Writes()), name="x")
    assert consumer.member.linger is None
    n, _ = await _read_while_trickling(redis, settings.model_copy(update={"linger_ms": 0.0}))
    assert n == 1, n


async def test_a_full_read_never_waits(redis: aioredis.Redis, settings: Settings):
    # the first read already holds as many as asked for (1, below LINGER_BELOW): no linger
    assert LINGER_BELOW > 1
    n, took = await _read_while_trickling(redis, settings.model_copy(update={"linger_ms": 1000.0}), count=1)
    assert n == 1 and took < 1.0, (n, took)


async def test_a_short_read_never_waits_while_a_transaction_is_in_flight(redis: aioredis.Redis, settings: Settings):
    writes = _Writes()
    storing = asyncio.create_task(writes.combiner.store([]))  # another partition's batch, being written
    await asyncio.sleep(0)  # the combiner's flusher starts: nothing else to await
    assert writes.combiner.busy
    n, took = await _read_while_trickling(redis, settings.model_copy(update={"linger_ms": 1000.0}), writes=writes)
    assert n == 1 and took < 1.0, (n, took)  # its batch would wait for that write anyway: no linger
    writes.done.set()
    assert (await storing) is not None
    assert not writes.combiner.busy
    # and once Postgres is idle, a short read lingers again
    n, _ = await _read_while_trickling(redis, settings.model_copy(update={"linger_ms": 400.0}), writes=writes)
    assert n == 5, n


# -- REFSTREAM_READ_INTERVAL_MS: a loaded partition is read on the member's tick ----------------

INTERVAL_S = 1.0


def _ticking(redis: aioredis.Redis, settings: Settings) -> tuple[Member, str]:
    member = Consumer(
        settings.model_copy(update={"linger_ms": 0.0, "read_interval_ms": INTERVAL_S * 1000, "block_ms": 50}),
        redis,
        cast(Pipeline, _Writes()),
        name="tick-test",
    ).member
    member._backlog[0] = False
    return member, member.keys.stream(0)


async def _fresh(redis: aioredis.Redis, stream: str) -> None:
    await redis.delete(stream)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)


async def test_a_read_after_one_that_found_entries_waits_for_the_tick(redis: aioredis.Redis, settings: Settings):
    member, stream = _ticking(redis, settings)
    await _fresh(redis, stream)
    loop = asyncio.get_running_loop()
    await redis.xadd(stream, {"n": "0"})
    first, _ = await member._read(0, stream, _Reads(), 100)
    assert len(first) == 1  # the first read of a partition waits for nothing
    await redis.xadd(stream, {"n": "1"})  # there before the read: only the tick can hold it back
    await redis.xadd(stream, {"n": "2"})
    started = loop.time()
    second, _ = await member._read(0, stream, _Reads(), 100)
    assert len(second) == 2, second
    tick = (started // INTERVAL_S + 1) * INTERVAL_S
    assert loop.time() >= tick - 0.01, (loop.time(), tick)  # the loop's clock: what the member waits on


async def test_a_read_that_found_nothing_or_a_full_batch_is_followed_at_once(redis: aioredis.Redis, settings: Settings):
    member, stream = _ticking(redis, settings)
    await _fresh(redis, stream)
    member._paced[0] = True  # as after a read that found some
    nothing, _ = await member._read(0, stream, _Reads(), 100)  # on the tick, then BLOCK 50 ms
    assert nothing == []
    assert member._paced[0] is False  # so the next read starts at once
    await redis.xadd(stream, {"n": "0"})
    await redis.xadd(stream, {"n": "1"})
    started = time.monotonic()
    full, _ = await member._read(0, stream, _Reads(), 1)  # after nothing: at once
    assert len(full) == 1
    rest, _ = await member._read(0, stream, _Reads(), 1)  # after a full read: at once
    assert len(rest) == 1
    assert time.monotonic() - started < INTERVAL_S / 2  # neither waited for a tick
    assert member._paced[0] is False  # nor will the next: a full read is a drain's
