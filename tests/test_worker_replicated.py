"""At ``REFSTREAM_ACK_DURABILITY=replicas:1``, each write that an ack, a delete, a Postgres
commit or an operator's "done" follows reaches a replica first (``ingest.contract.replicated``):
an entry's filing for the erasure sweep, a dead letter, a parked event, a letter requeued or
dropped, the edges' drop tallies a fold takes, a key's revocation, a workspace's deletion, a
feature's switch. And an erasure's sweep is marked done only if its fence reached the
primary it began on. A failover between the two steps sent the write to the old primary,
lost with it, and the next step to the promoted replica: an entry acked with its filing
gone kept its person's data after their erasure (the generative test's ``erased_kept`` of
two stream entries, seed 2113448591, Sentinel).

A primary and a replica of the test's own; the replica is frozen (SIGSTOP), so a WAIT counts
none; the worker's pipeline is driven batch by batch, as its consumer reads them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingest.contract import clicks, clock, wire
from ingest.contract import erasure as ledger
from ingest.contract.drops import field, live_key
from ingest.contract.errors import Unreplicated
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from ingest.edge import auth, flags
from ingest.manage import admin, deletion
from ingest.privacy import erasure as pg_erasure
from workers.consumer import dead_letters, drops
from workers.consumer.dead_letters import Dead
from workers.consumer.pipeline import Batch, Pipeline
from workers.group.errors import BatchOutage
from workers.ops import dead, erasure, erasure_redis

from ._world import World, make_world
from .faults._sentinel import wait_in_sync
from .faults._servers import FaultRedis
from .test_erasure import IP, Person
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


async def test_a_requeued_or_dropped_letter_is_deleted_only_once_a_replica_holds_where_it_went(
    settings: Settings,
    keys: Keys,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
) -> None:
    """``refstream dead requeue`` (and the console's retry) appends the letter's event to its
    partition, then deletes the letter; a drop moves it to the dropped letters, then
    deletes it. A failover between the two lost the event: the XADD with the old primary,
    the XDEL kept by the new one."""
    async with _pair(private_fault_redis) as (_, replica, redis, on_replica):
        click = _click(world, "https://ref.test/requeued")
        stream = keys.stream_for(world.link["code"])
        writer, fields = Replicated(redis, 0, 0), dict([wire.to_entry(click)])
        await dead_letters.write(writer, keys, stream, [Dead(b"1-1", "store: gone", fields)])
        await dead_letters.write(writer, keys, stream, [Dead(b"1-2", "store: gone", fields)])
        first, second = [sid.decode() for sid, _ in await redis.xrange(keys.dead)]
        waited = Replicated(redis, 1, 100)

        with _frozen(replica):
            with pytest.raises(Unreplicated):
                await dead.requeue(redis, keys, ids=[first], replicated=waited)
            with pytest.raises(Unreplicated):
                await dead.drop(redis, keys, "a test", ids=[second], replicated=waited)
        assert await redis.xlen(keys.dead) == 2  # both letters kept

        assert (await dead.requeue(redis, keys, ids=[first], replicated=waited)).done == 1
        assert (await dead.drop(redis, keys, "a test", ids=[second], replicated=waited)).done == 1
        requeued = [f for _, f in await on_replica.xrange(stream) if wire.from_entry(f).event_id == click.event_id]
        assert len(requeued) >= 1, requeued
        assert await on_replica.xlen(dead.dropped_key(keys)) >= 1


async def test_the_edges_drop_tallies_are_added_to_postgres_only_once_a_replica_holds_their_rename(
    settings: Settings,
    pg: asyncpg.Pool,
    keys: Keys,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
) -> None:
    """The workers' fold renames the edges' live tally to a fold key, adds it to Postgres
    under that key, then deletes it. A failover after the commit brought the live hash back
    unrenamed, and the next fold added the same refusals again under a new key."""
    async with _pair(private_fault_redis) as (_, replica, redis, _on_replica):
        refused = field(datetime.now(UTC).date().isoformat(), world.workspace_id, world.link["id"], "rate_limited")
        await redis.hincrby(live_key(keys.prefix), refused, 3)  # type: ignore[misc]
        waited = Replicated(redis, 1, 100)

        async def counted() -> int:
            n = await pg.fetchval("SELECT sum(n) FROM drop_stats WHERE link_id = $1", world.link["id"])
            return int(n or 0)

        with _frozen(replica):
            with pytest.raises(Unreplicated):
                await drops.fold(redis, pg, keys.prefix, waited)
        assert await counted() == 0  # nothing added while the rename could still be lost
        assert await drops.fold(redis, pg, keys.prefix, waited) == 3  # the renamed tally, once
        assert await drops.fold(redis, pg, keys.prefix, waited) == 0
        assert await counted() == 3


async def test_a_sweep_whose_primary_changed_while_it_ran_is_not_marked_done(
    settings: Settings,
    pg: asyncpg.Pool,
    keys: Keys,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep's fence (a write, then a WAIT) proves that replicas hold what the sweep did
    on the primary the fence reached. A failover during the sweep sent its first writes to
    the old primary, lost with it, and the fence to the new one, whose replica answered the
    WAIT: the erasure was marked done with its deletes gone. Here the primary restarts empty
    after the sweep's deletes (as a replica promoted without them would be) and its replica
    syncs again before the fence."""
    async with _pair(private_fault_redis) as (primary, _replica, redis, _on_replica):
        done = await pg_erasure.erase(pg, world.workspace_id, Person().external_id, by="test", archive_days=30)
        swept_before = erasure_redis.fingerprints

        async def failover_after(*args: Any) -> None:
            await swept_before(*args)
            primary.kill()
            primary.start()
            await primary.ready()
            await wait_in_sync(primary, 1)
            await redis.connection_pool.disconnect()

        async def redis_at() -> Any:
            return await pg.fetchval("SELECT redis_at FROM erasures WHERE id = $1", done.id)

        monkeypatch.setattr(erasure_redis, "fingerprints", failover_after)
        await erasure.sweep(pg, redis, keys, None, replicas=1, wait_ms=1000)
        assert await redis_at() is None  # the fence's server is not the one the sweep began on
        monkeypatch.setattr(erasure_redis, "fingerprints", swept_before)
        await erasure.sweep(pg, redis, keys, None, replicas=1, wait_ms=1000)
        assert await redis_at() is not None  # done by the next, on one server


async def test_a_key_is_revoked_only_once_a_replica_holds_its_entrys_tombstone(
    pg: asyncpg.Pool, keys: Keys, world: World, private_fault_redis: Callable[..., Awaitable[FaultRedis]]
) -> None:
    """A revocation marks the key's Redis entry (which lets it in for a day) before its row
    commits. A failover that lost the mark kept the day-long entry on the promoted replica:
    every edge took the revoked key until it expired, and a retry answered "not found"."""
    async with _pair(private_fault_redis) as (_, replica, redis, on_replica):
        async with pg.acquire() as conn:
            made = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["track"])
        entry = keys.apikey(hashlib.sha256(made["api_key"].encode()).hexdigest())
        with _frozen(replica):
            async with pg.acquire() as conn:
                with pytest.raises(Unreplicated):
                    await admin.revoke_key(conn, redis, keys, made["prefix"], replicas=1, wait_ms=100)
        assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", made["prefix"]) is None
        async with pg.acquire() as conn:
            await admin.revoke_key(conn, redis, keys, made["prefix"], replicas=1, wait_ms=1000)
        assert await on_replica.get(entry) == auth._UNKNOWN
        assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", made["prefix"]) is not None


async def test_a_workspace_is_deleted_only_once_a_replica_holds_its_keys_and_links_marked_gone(
    pg: asyncpg.Pool, keys: Keys, private_fault_redis: Callable[..., Awaitable[FaultRedis]]
) -> None:
    """``refstream workspace delete`` marked its keys and links unknown in Redis after the
    commit, waiting for nothing: a failover that lost the marks kept a link's entry (which
    lives until replaced) and a key's (a day) on the promoted replica, and every edge went
    on taking them; the rows gone, nothing named them to mark them again. The marks now go
    before the commit, on N replicas, else the deletion is rolled back, and the marks it
    made taken back (they refused the live workspace's links and keys until they expired)."""
    async with _pair(private_fault_redis) as (_, replica, redis, on_replica):
        code = f"GONE{secrets.token_hex(3).upper()}"
        gone = await make_world(pg, redis, keys, code=code)
        entry = keys.apikey(hashlib.sha256(gone.api_key.encode()).hexdigest())
        with _frozen(replica):
            async with pg.acquire() as conn:
                with pytest.raises(Unreplicated):
                    await deletion.delete_workspace(conn, redis, keys, gone.workspace_id, replicas=1, wait_ms=100)
        assert await pg.fetchval("SELECT count(*) FROM links WHERE code = $1", code) == 1  # rolled back
        # and its marks taken back: the live link and key were refused by every edge until
        # the marks expired (300 s, 60 s)
        live = await redis.get(keys.link(code))
        assert live is not None and not live.endswith(b"|-") and code.encode() in live, live
        assert await redis.get(entry) != auth._UNKNOWN
        async with pg.acquire() as conn:
            await deletion.delete_workspace(conn, redis, keys, gone.workspace_id, replicas=1, wait_ms=1000)
        assert await pg.fetchval("SELECT count(*) FROM links WHERE code = $1", code) == 0
        link = await on_replica.get(keys.link(code))
        assert link is not None and link.endswith(b"-"), link  # the version, then "no such link"
        assert await on_replica.get(entry) == auth._UNKNOWN


async def test_a_feature_switch_returns_once_a_replica_holds_it(
    keys: Keys, private_fault_redis: Callable[..., Awaitable[FaultRedis]]
) -> None:
    """``refstream feature disable`` answered done with its switch on the primary alone: a
    failover that lost it turned the killed feature back on."""
    async with _pair(private_fault_redis) as (_, replica, redis, on_replica):
        with _frozen(replica):
            with pytest.raises(Unreplicated):
                await flags.set_enabled(redis, keys, "referral", False, replicas=1, wait_ms=100)
        await flags.set_enabled(redis, keys, "referral", False, replicas=1, wait_ms=1000)
        assert await on_replica.get(keys.flag("referral")) == flags.DISABLED
        await flags.set_enabled(redis, keys, "referral", True, replicas=1, wait_ms=1000)
        assert await on_replica.exists(keys.flag("referral")) == 0
