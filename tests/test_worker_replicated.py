"""At ``REFSTREAM_ACK_DURABILITY=replicas:1``, each write of a worker that an ack follows (an
entry's filing for the erasure sweep, a dead letter, a parked event) reaches a replica before
the ack is sent (``workers.group.replicated``). A failover between the two sent the write to
the old primary, lost with it, and the ack to the promoted replica: the entry was acked with
its filing gone, and kept its person's data after their erasure (the generative test's
``erased_kept`` of two stream entries, seed 2113448591, Sentinel).

A primary and a replica of the test's own; the replica is frozen (SIGSTOP), so a WAIT counts
none; the worker's pipeline is driven batch by batch, as its consumer reads them."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingest.contract import clicks, clock
from ingest.contract import erasure as ledger
from ingest.contract.errors import Unreplicated
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from workers.consumer.pipeline import Batch, Pipeline
from workers.group.errors import BatchOutage

from ._world import World
from .faults._sentinel import wait_in_sync
from .faults._servers import FaultRedis
from .test_erasure import IP
from .test_erasure_entries import UA, _click, _read
from .test_refusals import replicas_1

# Redis servers of its own: the same whichever servers the suite uses (first pass only)
pytestmark = pytest.mark.once


@contextlib.asynccontextmanager
async def _pair(
    make: Callable[..., Awaitable[FaultRedis]],
) -> AsyncIterator[tuple[FaultRedis, FaultRedis, aioredis.Redis, aioredis.Redis]]:
    """A primary, its replica in sync, and a client of each."""
    primary = await make()
    replica = await make("--replicaof", "127.0.0.1", str(primary.port))
    await wait_in_sync(primary, 1)
    on_primary, on_replica = aioredis.Redis.from_url(primary.url), aioredis.Redis.from_url(replica.url)
    try:
        yield primary, replica, on_primary, on_replica
    finally:
        await on_primary.aclose()
        await on_replica.aclose()


@contextlib.contextmanager
def _frozen(server: FaultRedis) -> Any:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def _refused_unreplicated(pipeline: Pipeline, batch: Batch) -> None:
    with pytest.raises(BatchOutage) as raised:
        await pipeline.process(batch)
    assert isinstance(raised.value.__cause__, Unreplicated), raised.value.__cause__


async def _pending(redis: Any, batch: Batch) -> int:
    return int((await redis.xpending(batch.stream, GROUP))["pending"])


async def test_an_entrys_filing_is_on_a_replica_before_its_ack(
    settings: Settings,
    pg: asyncpg.Pool,
    keys: Keys,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    async with _pair(private_fault_redis) as (primary, replica, redis, on_replica):
        pipeline = Pipeline(replicas_1(settings, primary, tmp_path / "spool"), redis, pg)
        old = uuid7(clock.now_ms() - 3 * 86_400_000)  # minted on a clock three days behind
        made = _click(world, "https://ref.test/late")
        payload = {**made.payload, "click_id": clicks.mint(old), "visitor_id": clicks.mint(old)}
        click = Envelope(EventType.CLICK, Dialect.AFFITOR, payload, world.workspace_id, IP, UA, old)
        p = keys.partition_for(world.link["code"])
        batch = await _read(redis, keys, p, [click])
        async with pg.acquire() as conn:
            salt = await ledger.salt(conn)
        index = keys.entries_of(world.workspace_id, ledger.digests_of(salt, click, world.workspace_id)[0])
        member = f"{p}:{batch.ids[0].decode()}".encode()

        with _frozen(replica):
            await _refused_unreplicated(pipeline, batch)
        assert await _pending(redis, batch) == 1  # not acked: read again, filed again
        assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", click.event_id) == 1

        await pipeline.process(batch)  # the ack's turn again, as after an outage
        assert await _pending(redis, batch) == 0
        assert member in await on_replica.smembers(index)  # type: ignore[misc]


async def test_a_dead_letter_is_on_a_replica_before_its_entrys_ack(
    settings: Settings,
    pg: asyncpg.Pool,
    keys: Keys,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    async with _pair(private_fault_redis) as (primary, replica, redis, on_replica):
        pipeline = Pipeline(replicas_1(settings, primary, tmp_path / "spool"), redis, pg)
        stream = keys.stream(0)
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        sid = await redis.xadd(stream, {b"v": b"not an envelope"})
        read = await redis.xreadgroup(GROUP, "test", {stream: ">"})
        batch = Batch(0, stream, [(s, f) for _, page in read for s, f in page])

        with _frozen(replica):
            await _refused_unreplicated(pipeline, batch)
        assert len(batch.dead) == 1 and not batch.dead_lettered
        assert await _pending(redis, batch) == 1

        await pipeline.process(batch)
        assert await _pending(redis, batch) == 0
        letters = await on_replica.xrange(keys.dead)
        assert sid in {fields[b"id"] for _, fields in letters}, letters


async def test_a_parked_event_is_on_a_replica_before_its_entrys_ack(
    settings: Settings,
    pg: asyncpg.Pool,
    keys: Keys,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    async with _pair(private_fault_redis) as (primary, replica, redis, on_replica):
        pipeline = Pipeline(replicas_1(settings, primary, tmp_path / "spool"), redis, pg)
        click = _click(world, "https://ref.test/parked")
        room = keys.waiting_room(world.workspace_id)
        with _frozen(replica):
            with pytest.raises(Unreplicated):
                await pipeline.rooms.park([click])
        await pipeline.rooms.park([click])  # returns once the replica has both copies
        assert await on_replica.xlen(room) == 2
        assert world.workspace_id.encode() in await on_replica.smembers(keys.waiting_rooms)  # type: ignore[misc]
