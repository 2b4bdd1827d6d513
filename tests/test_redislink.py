"""The micro-batcher's own Redis connection (``ingest.link.resp``) against real Redis
servers: raw replies in order, error replies in their slots, AUTH and SELECT, a timeout
that must not leave replies owed to the next batch, and a server that dies and comes back.
Each case runs on asyncio's loop and on uvloop's (the edge's), whose transports differ."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.contract.errors import OutcomeUnknown, Unknown
from ingest.contract.settings import Settings
from ingest.edge.batcher import RedisBatcher
from ingest.link import resp
from ingest.link.choice import link_for
from ingest.link.errors import Rejected
from ingest.link.resp import DirectLink, PipelineLink, pack

from ._redis import PrivateRedis

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


async def up(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                await client.ping()
                return
            except (RedisConnectionError, OSError):
                await asyncio.sleep(0.05)  # polling a server that is starting: nothing to await
        raise AssertionError(f"{url} never answered")
    finally:
        await client.aclose()


def test_pack_is_resp():
    assert pack([("SET", "k", b"v\r\n", 12, 1.5)]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    )
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])
    with pytest.raises(TypeError):
        pack([("SET", "k", True)])  # not an integer to Redis: a caller's mistake


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00\xff\r\n", "", "ünï\u2028", 0, -5, 2**70, 0.1, 1e20, 1e-7, -0.0, float("inf"), memoryview(b"mv")],
)
def test_pack_writes_every_value_as_the_resp_of_its_bytes(value: object):
    """C (hiredis) or Python, the bytes are RESP's: $<length> then the value's bytes, a
    number as its decimal text (a float as Python's repr); a bytearray, which hiredis
    refuses, packs the same through the Python packer."""
    as_bytes = (
        bytes(value)
        if isinstance(value, memoryview)
        else value.encode()
        if isinstance(value, str)
        else value
        if isinstance(value, bytes)
        else (b"%d" % value if isinstance(value, int) else repr(value).encode())
    )
    expected = b"*2\r\n$3\r\nSET\r\n$%d\r\n%b\r\n" % (len(as_bytes), as_bytes)
    assert pack([("SET", value)]) == expected
    assert pack([cast(tuple[Any, ...], ["SET", value])]) == expected  # a command as a list packs as its tuple
    if isinstance(value, bytes):
        assert pack([("SET", bytearray(value))]) == expected
    assert pack([("SET", value), ("SET", value)]) == expected * 2


@pytest.mark.parametrize("loop", LOOPS)
def test_replies_come_back_raw_and_in_order(loop: str, settings: Settings):
    key = f"{settings.stream_prefix}:link"

    async def main() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        link = link_for(client)
        assert isinstance(link.inner, DirectLink)
        try:
            replies = await link.send(
                [
                    ("SET", key, "v1"),
                    ("GET", key),
                    ("INCR", key),  # not an integer: an error reply, in its own slot
                    ("DEL", key),
                    ("GET", key),
                    ("EVAL", "return {1, 'two', {3}}", 0),
                ]
            )
            assert replies[:2] == [b"OK", b"v1"]
            # behind the link's boundary: the tree's Rejected (a not-sent), never redis-py's
            assert isinstance(replies[2], Rejected) and "not an integer" in str(replies[2])
            assert replies[2].code == "ERR" and isinstance(replies[2].__cause__, ResponseError)
            assert replies[3:] == [1, None, [1, b"two", [3]]]
            # thousands of commands in one round trip, replies split over many reads
            many = await link.send([("ECHO", f"m{i}" * 20) for i in range(5000)])
            assert many == [f"m{i}".encode() * 20 for i in range(5000)]
        finally:
            await link.close()
            await client.delete(key)
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_out_of_step_is_never_handed_to_a_command(loop: str, settings: Settings):
    """Whatever put a connection out of step (here a reply nobody asked for, written ahead
    of the round trip's own), the round trip's closing ECHO does not come back last: the
    batch fails and the connection is dropped, and the stray reply answers nobody."""
    key = f"{settings.stream_prefix}:step"

    async def main() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        await client.set(key, "someone else's")
        link = DirectLink.for_client(client)
        assert link is not None
        try:
            assert await link.send([("PING",)]) == [b"PONG"]
            conn = link._conn
            assert conn is not None and conn.transport is not None
            conn.transport.write(pack([("GET", key)]))  # its reply will come first
            # (the closing ECHO's reply is one too many when it comes in the same read)
            with pytest.raises(RedisConnectionError, match=r"out of step|no command on the connection is owed"):
                await link.send([("GET", f"{key}:mine")])
            assert conn.closed and link._conn is None
            assert await link.send([("GET", f"{key}:mine")]) == [None]  # a new connection: in step
        finally:
            await link.close()
            await client.delete(key)
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_auth_and_select(loop: str, private_redis: PrivateRedis, settings: Settings):
    base = private_redis.url.rsplit("/", 1)[0]

    async def main() -> None:
        await up(private_redis.url)
        admin = aioredis.Redis.from_url(private_redis.url)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        wrong = DirectLink.for_client(aioredis.Redis.from_url(f"redis://:nope@{base[8:]}/0"))
        assert wrong is not None
        with pytest.raises(RedisConnectionError, match="refused"):
            await wrong.send([("PING",)])
        client = aioredis.Redis.from_url(f"redis://:s3cret@{base[8:]}/5")
        link = link_for(client)
        try:
            assert await link.send([("SET", "where", "db5")]) == [b"OK"]
            assert await client.get("where") == b"db5"  # redis-py on db 5 sees it
            db0 = aioredis.Redis.from_url(f"redis://:s3cret@{base[8:]}/0")
            assert await db0.get("where") is None
            await db0.aclose()
        finally:
            await link.close()
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_timeout_leaves_nothing_owed_to_the_next_batch(loop: str, settings: Settings):
    key = f"{settings.stream_prefix}:never"

    async def main() -> None:
        # a timeout of 1 s, also the reconnect's and the PING's: the suite's Redis is shared
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=1.0)
        link = link_for(client)
        try:
            with pytest.raises(OutcomeUnknown) as err:  # the BLPOP may run yet
                await link.send([("BLPOP", key, 4)])  # blocks past the 1 s timeout
            assert err.value.reason is Unknown.LOST and isinstance(err.value.__cause__, RedisTimeoutError)
            # the BLPOP's late nil must not be taken for this PING's reply
            assert await link.send([("PING",), ("ECHO", "after")]) == [b"PONG", b"after"]
        finally:
            await link.close()
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_dead_server_fails_the_batch_and_the_link_reconnects(loop: str, private_redis: PrivateRedis):
    async def main() -> None:
        await up(private_redis.url)
        client = aioredis.Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=2)
        link = link_for(client)
        try:
            assert await link.send([("SET", "a", "1")]) == [b"OK"]
            private_redis.kill()
            with pytest.raises(OutcomeUnknown):  # the link's boundary: the tree's, not redis-py's
                await link.send([("GET", "a")])
            with pytest.raises(OutcomeUnknown, match=r"127\.0\.0\.1"):
                await link.send([("GET", "a")])  # still down: refused at connect
            private_redis.start()  # empty again: nothing is persisted
            await up(private_redis.url)
            assert await link.send([("GET", "a"), ("SET", "a", "2"), ("GET", "a")]) == [None, b"OK", b"2"]
        finally:
            await link.close()
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_the_server_dropped_is_replaced_before_the_next_batch(loop: str, settings: Settings):
    key = f"{settings.stream_prefix}:kept"

    async def main() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        link = link_for(client)
        try:
            (first_id, ok) = await link.send([("CLIENT", "ID"), ("SET", key, "v")])
            assert ok == b"OK"
            assert await client.execute_command("CLIENT", "KILL", "ID", first_id) == 1
            # the batch after the kill is answered, on a new connection
            (second_id, value) = await link.send([("CLIENT", "ID"), ("GET", key)])
            assert value == b"v" and second_id != first_id
        finally:
            await link.close()
            await client.delete(key)
            await client.aclose()

    run(loop, main)


def test_an_idle_connection_is_checked_with_a_ping(private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch):
    async def pings(client: aioredis.Redis) -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    async def main() -> None:
        await up(private_redis.url)
        client = aioredis.Redis.from_url(private_redis.url)
        link = link_for(client)
        try:
            await link.send([("SET", "a", "1")])
            await link.send([("GET", "a")])  # busy: no check
            await client.config_resetstat()
            assert await pings(client) == 0
            monkeypatch.setattr(resp, "HEALTH_CHECK_S", 0.0)  # from now on, every batch follows an idle spell
            assert await link.send([("GET", "a")]) == [b"1"]
            assert await pings(client) == 1
        finally:
            await link.close()
            await client.aclose()

    asyncio.run(main())


async def _fake_redis(reply: bytes | None) -> tuple[asyncio.Server, int, list[asyncio.Future[None]]]:
    """A server that answers every read with ``reply`` (or never answers); each connection's
    future resolves when the client closes it."""
    closed: list[asyncio.Future[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        closed.append(done)
        while data := await reader.read(65536):
            if reply is not None:  # one for each command read (each a RESP array: "*<n>")
                writer.write(reply * (data.startswith(b"*") + data.count(b"\r\n*")))
        done.set_result(None)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], closed


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loading_server_fails_the_whole_batch_as_unavailable(loop: str):
    async def main() -> None:
        server, port, closed = await _fake_redis(b"-LOADING Redis is loading the dataset in memory\r\n")
        link = DirectLink(port=port, timeout_s=2)
        try:
            # as with redis-py: a ConnectionError for the batch (callers spool or answer 503),
            # never an error reply left in a slot for a caller to trip over
            with pytest.raises(BusyLoadingError):
                await link.send([("PING",)])
            await asyncio.wait_for(closed[0], 5)  # and the connection is dropped
        finally:
            await link.close()
            server.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_handshake_times_out_and_closes_its_socket(loop: str):
    async def main() -> None:
        server, port, closed = await _fake_redis(None)  # accepts, never answers
        link = DirectLink(port=port, password="pw", db=3, timeout_s=0.3)
        try:
            for attempt in range(2):
                with pytest.raises(RedisTimeoutError, match="connecting"):
                    await link.send([("PING",)])
                await asyncio.wait_for(closed[attempt], 5)  # each attempt's socket closed
        finally:
            await link.close()
            server.close()

    run(loop, main)


def test_the_batcher_reloads_scripts_the_server_forgot(private_redis: PrivateRedis):
    async def main() -> None:
        await up(private_redis.url)
        client = aioredis.Redis.from_url(private_redis.url)
        batcher = RedisBatcher(client)
        sha = batcher.script("return ARGV[1] .. '!'")
        try:
            assert await batcher.execute(("EVALSHA", sha, 0, "a")) == [b"a!"]  # loaded on first use
            await client.script_flush()
            # NOSCRIPT: the batcher loads its scripts again and re-runs what failed, in place
            assert await batcher.execute(("GET", "none"), ("EVALSHA", sha, 0, "b")) == [None, b"b!"]
        finally:
            await batcher.close()
            await client.aclose()

    asyncio.run(main())


def test_cluster_and_tls_clients_go_through_redis_py():
    assert DirectLink.for_client(aioredis.Redis.from_url("rediss://127.0.0.1:1/0")) is None
    assert isinstance(link_for(aioredis.Redis.from_url("rediss://127.0.0.1:1/0")).inner, PipelineLink)
    assert isinstance(link_for(aioredis.Redis.from_url("unix:///tmp/none.sock?db=2")).inner, DirectLink)
