"""REFSTREAM_ACK_DURABILITY against real servers: ``replicas:N`` sends one WAIT per round
trip that holds an event and does not accept the batch on the primary alone when fewer
replicas confirm it (the edge spools what the primary holds, and refuses what it never
sent); ``fsync`` refuses to start on a Redis without WAITAOF; a ``redis+sentinel://`` URL
reaches the primary Sentinel names, and the edge's link follows a failover (READONLY drops
its connection, the next one asks Sentinel again)."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from ingest.contract import clicks, wire
from ingest.contract.connections import connect_redis
from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.events import uuid7
from ingest.contract.keys import Keys
from ingest.contract.sentinel_url import sentinel_target
from ingest.contract.settings import Settings, explain, parse_durability
from ingest.edge.batcher import RedisBatcher
from ingest.link import breaker as breaker_module
from ingest.link.choice import link_for
from ingest.link.durability import Durability, Undurable, startup_problem
from ingest.link.resp import DirectLink
from ingest.spool.spool import Spool

from ._procs import Procs, env_for, run_command
from .conftest import wait_for
from .faults._sentinel import MASTER, SentinelServer, wait_in_sync
from .faults._servers import FaultRedis

# Redis servers (primary, replica, sentinel, valkey) of its own:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = pytest.mark.once

XADD = ("XADD", "durability:test", "*", "f", "v")

# -- the settings ------------------------------------------------------------------------


def test_levels_parse():
    assert parse_durability("primary") == (0, False)
    assert parse_durability(" Replicas:2 ") == (2, False)
    assert parse_durability("fsync") == (0, True)
    for bad in ("replicas", "replicas:0", "replicas:x", "all", "replicas:17"):
        with pytest.raises(ValueError):
            parse_durability(bad)
    with pytest.raises(ValidationError) as err:
        Settings(ack_durability="replicas:x")
    assert explain(err.value).startswith("REFSTREAM_ACK_DURABILITY: one of primary, replicas:N")
    with pytest.raises(ValidationError) as err:
        Settings(ack_durability="replicas:1", ack_wait_ms=1000, redis_deadline_ms=1000)
    assert "REFSTREAM_ACK_WAIT_MS=1000" in explain(err.value)
    with pytest.raises(ValidationError) as err:
        Settings(ack_durability="fsync", redis_cluster=True)
    assert "not supported on a Redis Cluster" in explain(err.value)


def test_wait_replies_are_judged():
    two = Durability(replicas=2, wait_ms=100)
    assert two.command() == ("WAIT", 2, 100)
    assert two.failure(2) is None and two.failure(3) is None
    assert "1 of 2 replicas" in str(two.failure(1))
    assert _unconfirmed(two.failure(aioredis.ResponseError("ERR boom")))
    aof = Durability(fsync=True, wait_ms=100)
    assert aof.command() == ("WAITAOF", 1, 0, 100)
    assert aof.failure([1, 0]) is None
    assert _unconfirmed(aof.failure([0, 0]))
    assert _unconfirmed(aof.failure(aioredis.ResponseError("ERR unknown command 'WAITAOF'")))


def _unconfirmed(exc: object) -> bool:
    return isinstance(exc, OutcomeUnknown) and exc.reason is Unknown.UNCONFIRMED


def test_sentinel_urls_parse():
    t = sentinel_target("redis+sentinel://user:p%40ss@h1:26379,h2:26380,[::1]/main/2")
    assert t is not None
    assert t.sentinels == (("h1", 26379), ("h2", 26380), ("::1", 26379))
    assert (t.master, t.db, t.username, t.password) == ("main", 2, "user", "p@ss")
    assert sentinel_target("redis://h:6379/0") is None
    for bad in ("redis+sentinel://h1/", "redis+sentinel:///main", "redis+sentinel://h1:x/main"):
        with pytest.raises(ValueError):
            sentinel_target(bad)
    with pytest.raises(ValidationError) as err:
        Settings(redis_url="redis+sentinel://h1/")
    assert "redis+sentinel://host:26379" in explain(err.value)
    with pytest.raises(ValidationError):
        Settings(redis_url="redis+sentinel://h1/main", redis_cluster=True)


# -- replicas:N --------------------------------------------------------------------------


@pytest.fixture
def servers(private_fault_redis: Callable[..., Awaitable[FaultRedis]]) -> Callable[..., Awaitable[FaultRedis]]:
    return private_fault_redis


async def wait_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_replicas_wait_confirms_each_round_trip(servers):
    primary = await servers()
    replica = await servers("--replicaof", "127.0.0.1", str(primary.port))
    await wait_in_sync(primary, 1)
    client = aioredis.Redis.from_url(primary.url)
    on_replica = aioredis.Redis.from_url(replica.url)
    batcher = RedisBatcher(client, durability=Durability(replicas=1, wait_ms=500))
    try:
        assert await batcher.execute(("GET", "x")) == [None]  # no event: no WAIT
        assert await wait_calls(client) == 0
        (entry,) = await batcher.execute(XADD, durable=True)
        assert isinstance(entry, bytes)
        assert await wait_calls(client) == 1
        # confirmed: on the replica already, no waiting for it
        assert [e[0] for e in await on_replica.xrange("durability:test")] == [entry]
    finally:
        await batcher.close()
        await client.aclose()
        await on_replica.aclose()


async def test_an_unconfirmed_batch_is_not_accepted_until_replicas_return(servers, monkeypatch):
    # the first probe 2 s after the failure, not 50 ms: the "refused at once" step below
    # must come before it, on a machine that may pause this process for tens of ms
    monkeypatch.setattr(breaker_module, "PROBE_FIRST_S", 2.0)
    primary = await servers()
    client = aioredis.Redis.from_url(primary.url)
    batcher = RedisBatcher(client, durability=Durability(replicas=1, wait_ms=100))
    try:
        with pytest.raises(OutcomeUnknown, match="0 of 1 replicas") as err:  # ran on the primary
            await batcher.execute(XADD, durable=True)
        assert err.value.reason is Unknown.UNCONFIRMED
        # the XADD did reach the primary: a spooled copy may follow it (one event_id, stored once)
        assert await client.xlen("durability:test") == 1
        assert await batcher.execute(("GET", "x")) == [None]  # what is not an event goes on
        with pytest.raises(Undurable, match="probing"):  # refused at once, not sent
            await batcher.execute(XADD, durable=True)
        with pytest.raises(NotSent, match="probing"):  # the branch decides: never sent
            await batcher.execute(XADD, durable=True)
        assert await client.xlen("durability:test") == 1

        await servers("--replicaof", "127.0.0.1", str(primary.port))
        await wait_in_sync(primary, 1)

        async def accepted() -> bool:
            try:
                await batcher.execute(XADD, durable=True)
                return True
            except (Undurable, OutcomeUnknown):
                return False

        await wait_for(accepted, timeout=20, what="a durable write once a replica is back")
        assert not batcher.undurable.open
    finally:
        await batcher.close()
        await client.aclose()


async def test_the_spool_keeps_what_replicas_have_not_confirmed(servers, tmp_path: Path):
    primary = await servers()
    client = aioredis.Redis.from_url(primary.url)
    # WAIT's 1 s: time for a replica in sync to confirm, on a loaded machine
    spool = Spool(tmp_path, max_bytes=1 << 20, durability=Durability(replicas=1, wait_ms=1000))
    try:
        for n in range(3):
            await spool.append("durability:test", b'{"n":%d}' % n)
        with pytest.raises(OutcomeUnknown):  # in the primary, on no replica: nothing may be deleted
            await spool.drain(client)
        assert spool.entries() == 3 and await client.xlen("durability:test") == 3

        await servers("--replicaof", "127.0.0.1", str(primary.port))
        await wait_in_sync(primary, 1)
        assert await spool.drain(client) == 3  # sent again (same event ids), confirmed, deleted
        assert spool.entries() == 0
    finally:
        await spool.close()
        await client.aclose()


async def test_short_of_replicas_the_edge_spools_what_it_sent_and_refuses_the_rest(
    settings: Settings, servers, tmp_path: Path
):
    primary = await servers()
    own = settings.model_copy(update={"redis_url": primary.url})
    procs = Procs(own, tmp_path)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        ws["code"] = f"dur{secrets.token_hex(4)}"
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", ws["code"])
        base = await procs.start_edge(REFSTREAM_ACK_DURABILITY="replicas:1", REFSTREAM_ACK_WAIT_MS="100")
        auth = {"Authorization": f"Bearer {ws['api_key']}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/v1/referral/click/{ws['code']}") as r:
                assert r.status == 200, await r.text()  # public: into the spool
            async with http.post(f"{base}/v1/track/click", json={"ref": ws["code"]}, headers=auth) as r:
                # keyed: refused at once while unconfirmed (nothing sent), or, sent as the
                # breaker's probe, in the primary short of replicas: spooled, never refused
                assert r.status in (200, 503), await r.text()
                assert "Refstream-Outcome" not in r.headers
                if r.status == 503:
                    assert r.headers["Retry-After"] == "1"
            async with http.get(f"{base}/metrics") as r:
                assert 'refstream_events_accepted_total{dialect="biore",to="spool"} 1.0' in await r.text()

            await servers("--replicaof", "127.0.0.1", str(primary.port))
            await wait_in_sync(primary, 1)

            async def keyed_accepted() -> bool:
                async with http.post(f"{base}/v1/track/click", json={"ref": ws["code"]}, headers=auth) as r:
                    return r.status == 200

            await wait_for(keyed_accepted, timeout=20, what="keyed events accepted once a replica is back")
    finally:
        procs.stop_all()


async def test_short_of_replicas_a_dub_browsers_repeat_answers_its_spooled_first_click(
    settings: Settings, servers, tmp_path: Path
):
    """A Dub click the edge spools without having sent it (the durability breaker open: no
    replica confirms writes) names itself for its browser in Redis all the same, so the
    browser's repeat answers its id instead of counting a second click (the generative
    test's seeds 1848871517 and 1800179931)."""
    primary = await servers()
    own = settings.model_copy(update={"redis_url": primary.url})
    keys = Keys(own.stream_prefix, own.partitions)
    procs = Procs(own, tmp_path)
    redis = aioredis.Redis.from_url(primary.url)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        code = f"dur{secrets.token_hex(4)}"
        link = ("link", "create", "--workspace", ws["workspace_id"], "--code", code, "--url", "https://shop.test/")
        await procs.cli(*link)
        # the spool's drain, which sends what it holds to the primary (its name for the browser
        # too) even short of the level, kept from running while the test does
        base = await procs.start_edge(
            REFSTREAM_ACK_DURABILITY="replicas:1", REFSTREAM_ACK_WAIT_MS="100", REFSTREAM_SPOOL_DRAIN_EVERY_S="600"
        )
        click = {"domain": "shop.test", "key": code}

        async def in_redis(click_id: str) -> bool:
            for p in range(own.partitions):
                for _, fields in await redis.xrange(keys.stream(p)):
                    if clicks.mint(wire.from_entry(fields).event_id) == click_id:
                        return True
            return False

        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/v1/referral/click/{code}") as r:
                assert r.status == 200, await r.text()  # unconfirmed: the breaker opens
            # a browser whose first click the breaker kept from Redis (one sent as the breaker's
            # probe reached the primary, its name with it: another browser is tried)
            for n in range(20):
                browser = {"User-Agent": f"browser-{n}"}
                async with http.post(f"{base}/track/click", json=click, headers=browser) as r:
                    assert r.status == 200, await r.text()
                    first = (await r.json())["clickId"]
                if not await in_redis(first):
                    break
            else:
                pytest.fail("every first click was sent as the breaker's probe")
            async with http.post(f"{base}/track/click", json=click, headers=browser) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["clickId"] == first  # the repeat: the spooled click's id
            async with http.get(f"{base}/metrics") as r:
                assert 'refstream_events_accepted_total{dialect="dub",to="spool"}' in await r.text()
    finally:
        await redis.aclose()
        procs.stop_all()


async def test_a_deferred_lead_is_answered_200_only_at_the_durability_level(
    settings: Settings, servers, tmp_path: Path
):
    """Dub's deferred lead appends no event: what it keeps is its click, for the customer's
    later lead. Kept short of the level, a failover lost it after its 200 (the generative
    test's seed 2113815063): it is answered 503 until a replica confirms it."""
    primary = await servers()
    own = settings.model_copy(update={"redis_url": primary.url})
    procs = Procs(own, tmp_path)
    redis = aioredis.Redis.from_url(primary.url)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        code = f"dur{secrets.token_hex(4)}"
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
        click_id = clicks.mint(uuid7())
        ref = clicks.ClickRef(click_id, code, ws["workspace_id"], click_id, int(time.time() * 1000))
        await redis.execute_command(*ref.cache_command(Keys(own.stream_prefix, own.partitions), 3600))
        base = await procs.start_edge(REFSTREAM_ACK_DURABILITY="replicas:1", REFSTREAM_ACK_WAIT_MS="100")
        auth = {"Authorization": f"Bearer {ws['api_key']}"}
        deferred = {"clickId": click_id, "eventName": "Sign up", "customerExternalId": "d1", "mode": "deferred"}
        later = {"clickId": "", "eventName": "Activated", "customerExternalId": "d1"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/track/lead", json=deferred, headers=auth) as r:
                assert r.status == 503, await r.text()  # no replica to confirm it
            await servers("--replicaof", "127.0.0.1", str(primary.port))
            await wait_in_sync(primary, 1)

            async def deferred_taken() -> bool:
                async with http.post(f"{base}/track/lead", json=deferred, headers=auth) as r:
                    return r.status == 200

            await wait_for(deferred_taken, timeout=20, what="the deferred lead taken once a replica is back")
            async with http.post(f"{base}/track/lead", json=later, headers=auth) as r:
                assert r.status == 200 and (await r.json())["click"] == {"id": click_id}
    finally:
        await redis.aclose()
        procs.stop_all()


# -- fsync -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["work"]])
async def test_fsync_refuses_a_redis_without_waitaof(settings: Settings, command: list[str]):
    # this machine's Redis is 7.0: no WAITAOF (7.2); the success path is tested below on valkey
    env = env_for(settings, REFSTREAM_ACK_DURABILITY="fsync")
    code, _, err = await run_command(*command, env=env, within_s=60)
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert code != 0 and len(lines) == 1, err
    assert "REFSTREAM_ACK_DURABILITY=fsync needs WAITAOF, Redis >= 7.2, and this Redis is" in lines[0], err


def _valkey() -> str:
    found = shutil.which("valkey-server") or str(Path(sys.executable).parent / "valkey-server")
    if not os.access(found, os.X_OK):  # not in every machine's package sources (bookworm: backports only)
        pytest.skip("valkey-server is not in this machine's package sources (valkey-tools): no Redis >= 7.2 here")
    return found


async def test_fsync_confirms_each_round_trip_on_a_redis_with_waitaof(settings: Settings, tmp_path: Path):
    # valkey 8 speaks Redis 7.2's protocol, WAITAOF included (the machine's Redis is 7.0)
    server = FaultRedis("--appendonly", "yes", binary=_valkey())
    without_aof = FaultRedis(binary=_valkey())
    for s in (server, without_aof):
        s.start()
        await s.ready()
    client = aioredis.Redis.from_url(server.url)
    fsync = settings.model_copy(update={"ack_durability": "fsync"})
    batcher = RedisBatcher(client, durability=Durability.of(fsync))
    procs = Procs(settings.model_copy(update={"redis_url": server.url}), tmp_path)
    try:
        assert await startup_problem(client, fsync) is None
        bare = aioredis.Redis.from_url(without_aof.url)
        assert "set appendonly yes" in (await startup_problem(bare, fsync) or "")
        await bare.aclose()

        (entry,) = await batcher.execute(XADD, durable=True)
        assert isinstance(entry, bytes)
        stats = await client.info("commandstats")
        assert int(stats["cmdstat_waitaof"]["calls"]) == 1  # one WAITAOF, for the round trip that wrote

        # the edge starts at this level and answers a keyed click once the AOF has it
        ws = await procs.cli("workspace", "create", "Acme")
        code = f"aof{secrets.token_hex(4)}"
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
        base = await procs.start_edge(REFSTREAM_ACK_DURABILITY="fsync")
        auth = {"Authorization": f"Bearer {ws['api_key']}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/track/click", json={"ref": code}, headers=auth) as r:
                assert r.status == 200, await r.text()
        stats = await client.info("commandstats")
        assert int(stats["cmdstat_waitaof"]["calls"]) >= 2
    finally:
        procs.stop_all()
        await batcher.close()
        await client.aclose()
        server.destroy()
        without_aof.destroy()


# -- Sentinel ----------------------------------------------------------------------------


async def test_sentinel_client_and_link_follow_a_failover(settings: Settings, servers):
    primary = await servers()
    replica = await servers("--replicaof", "127.0.0.1", str(primary.port))
    await wait_in_sync(primary, 1)
    sentinel = SentinelServer(primary, primary.port)
    sentinel.start()
    try:
        await sentinel.wait_master(primary.port)
        await sentinel.wait_replicas(1)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{MASTER}/0"
        client = connect_redis(settings.model_copy(update={"redis_url": url}))
        link = link_for(client)
        assert isinstance(link.inner, DirectLink)
        try:
            assert isinstance((await link.send([XADD]))[0], bytes)
            assert (await client.info("server"))["tcp_port"] == primary.port

            admin = aioredis.Redis(port=sentinel.port)
            await admin.execute_command("SENTINEL", "FAILOVER", MASTER)  # promote the replica
            await admin.aclose()
            await sentinel.wait_master(replica.port)
            old = aioredis.Redis.from_url(primary.url)

            async def demoted() -> bool:
                try:
                    role: str = (await old.info("replication"))["role"]
                    return role == "slave"
                except aioredis.ConnectionError:
                    return False  # Sentinel kills the clients of the server it reconfigures

            await wait_for(demoted, timeout=30, what="the old primary to become a replica")
            await old.aclose()

            # the link's connection is to the old primary, now a replica: a READONLY reply,
            # or the connection Sentinel killed, drops it, and the next round trip asks
            # Sentinel and lands on the new primary
            deadline = time.monotonic() + 10
            while True:
                try:
                    reply = (await link.send([XADD]))[0]
                except aioredis.ConnectionError:
                    continue
                finally:
                    assert time.monotonic() < deadline, "the link never reached the new primary"
                if isinstance(reply, bytes):
                    break
                assert isinstance(reply, aioredis.ReadOnlyError), reply
            new = aioredis.Redis.from_url(replica.url)
            assert await new.xlen("durability:test") == 2
            await new.aclose()
        finally:
            await link.close()
            await client.aclose()
    finally:
        sentinel.destroy()


async def test_short_of_replicas_behind_sentinel_the_link_asks_again_where_the_primary_is(settings: Settings, servers):
    """A primary Sentinel has deposed but cannot turn into a replica (its REPLICAOF is out of
    reach here, as a partition would put it) still takes writes, and none survives its turn.
    A write there falls short of ``replicas:1`` (no replica follows it now): the link drops
    its connection, so what the edge writes next (a spooled click's name, say) reaches the
    primary Sentinel names. The old code kept writing to the deposed one."""
    deposed = await servers("--rename-command", "REPLICAOF", "", "--rename-command", "SLAVEOF", "")
    heir = await servers("--replicaof", "127.0.0.1", str(deposed.port))
    follower = await servers("--replicaof", "127.0.0.1", str(deposed.port), "--replica-priority", "0")
    await wait_in_sync(deposed, 2)
    sentinel = SentinelServer(deposed, deposed.port)
    sentinel.start()
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{MASTER}/0"
    client = connect_redis(settings.model_copy(update={"redis_url": url}))
    batcher = RedisBatcher(client, durability=Durability(replicas=1, wait_ms=300))
    old = aioredis.Redis.from_url(deposed.url, decode_responses=True)
    new = aioredis.Redis.from_url(heir.url, decode_responses=True)
    other = aioredis.Redis.from_url(follower.url, decode_responses=True)
    try:
        await sentinel.wait_master(deposed.port)
        await sentinel.wait_replicas(2)
        (entry,) = await batcher.execute(XADD, durable=True)  # confirmed: the heir has it
        assert isinstance(entry, bytes)

        admin = aioredis.Redis(port=sentinel.port)
        await admin.execute_command("SENTINEL", "FAILOVER", MASTER)
        await admin.aclose()
        await sentinel.wait_master(heir.port)

        async def turned() -> bool:  # the follower follows the heir; the deposed is followed by none
            try:
                info = await other.info("replication")
            except aioredis.ConnectionError:
                return False  # Sentinel kills the clients of the server it reconfigures
            return bool(info.get("master_port") == heir.port and info.get("master_link_status") == "up")

        await wait_for(turned, timeout=30, what="the follower to replicate the new primary")

        async def switched() -> bool:  # the failover's end: what Sentinel tells its clients
            pool: Any = client.connection_pool  # Sentinel's
            return bool((await pool.get_master_address())[1] == heir.port)

        await wait_for(switched, timeout=30, what="Sentinel to name the new primary to its clients")
        assert (await old.info("replication"))["role"] == "master"  # deposed, not turned

        with pytest.raises(OutcomeUnknown) as short:
            await batcher.execute(XADD, durable=True)
        assert short.value.reason is Unknown.UNCONFIRMED
        name = f"seen:{secrets.token_hex(4)}"
        assert await batcher.execute(("SET", name, "clk_first")) in ([b"OK"], [True])
        assert await new.get(name) == "clk_first"  # where it survives
    finally:
        await batcher.close()
        await client.aclose()
        for c in (old, new, other):
            await c.aclose()
        sentinel.destroy()
