"""Every reply answers its own request (docs/guarantees.md), against a private redis-server
that is SIGSTOPped mid round trip: the caller's deadline fires, the next round trip is
written while the server is frozen, and at SIGCONT the server answers everything it was
sent, on every socket. Each request reads a value only it can get back (a key of its own,
an ``ECHO`` of a unique token), so a reply handed to the wrong request shows.

Also: a reply of the wrong shape fails its round trip as a Redis error and drops the
connection, and a script the server forgot, rerun for a durable request, ends with its own
durability wait. Each case that involves a transport runs on asyncio's loop and uvloop's."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import RedisError

from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.edge.batcher import RedisBatcher, RedisDown
from ingest.edge.ratelimit import RateLimiter, well_formed
from ingest.link.durability import Durability
from ingest.link.resp import DirectLink

from ._redis import PrivateRedis

LOOPS = ["asyncio", "uvloop"]
LONG_SOCKET_TIMEOUT = 30  # the link's own timeout never fires here: the caller's deadline does


def run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


@contextmanager
def stopped(server: PrivateRedis) -> Iterator[None]:
    """The server frozen (SIGSTOP) inside the block, resumed (SIGCONT) however it ends. The
    kernel still completes handshakes into its listen backlog: connects succeed, writes land."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.005)


def in_flight(link: object) -> bool:
    """A round trip written and waiting for its replies on the link's connection."""
    conn = getattr(link, "_conn", None)
    return conn is not None and conn.done is not None and not conn.done.done()


async def up(url: str) -> aioredis.Redis:
    client: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=LONG_SOCKET_TIMEOUT)
    for _ in range(200):
        try:
            await client.ping()
            return client
        except (RedisError, OSError):
            await asyncio.sleep(0.05)  # a server that is starting: nothing to await
    raise AssertionError(f"{url} never answered")


async def let_through(batcher: RedisBatcher, *commands: Any) -> asyncio.Task[list[Any]]:
    """``execute(*commands)`` once the open breaker lets a probe through (one per interval)."""
    while True:
        task = asyncio.ensure_future(batcher.execute(*commands))
        await asyncio.sleep(0)  # RedisDown is raised before the request waits for anything
        if not task.done() or not isinstance(task.exception(), RedisDown):
            return task
        await asyncio.sleep(0.01)  # the breaker's probe interval is time: poll it


@pytest.mark.parametrize("loop", LOOPS)
def test_a_round_trip_its_caller_gave_up_on_never_answers_the_next(loop: str, private_redis: PrivateRedis):
    async def main() -> None:
        client = await up(private_redis.url)
        link = DirectLink(port=private_redis.port, timeout_s=LONG_SOCKET_TIMEOUT)
        try:
            assert await link.send([("SET", f"k{i}", f"v{i}") for i in range(3)]) == [b"OK"] * 3
            with stopped(private_redis):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):  # the batcher's deadline: a cancellation
                        await link.send([("GET", "k0"), ("GET", "k1")])
                second = asyncio.create_task(link.send([("GET", "k2")]))
                await until(lambda: in_flight(link), "the second round trip written")
            # the frozen server answers both round trips now; k0's and k1's values are not k2's
            assert await second == [b"v2"]
            assert await link.send([("GET", "k1"), ("ECHO", "last")]) == [b"v1", b"last"]
        finally:
            await link.close()
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_every_request_gets_its_own_reply_through_a_stall(loop: str, private_redis: PrivateRedis):
    async def main() -> None:
        client = await up(private_redis.url)
        # the probe must be seen in flight before its own deadline ends it: on a loaded
        # machine a 0.3 s window was missed, so the deadline is long enough to watch for
        batcher = RedisBatcher(client, deadline_s=1.5)
        wrong: list[tuple[str, object]] = []

        async def echo(token: str, task: asyncio.Task[list[Any]] | None = None) -> bool:
            """True when answered; a Redis error is an answer too, another's token is not."""
            try:
                replies = await (task or batcher.execute(("ECHO", token)))
            except (NotSent, OutcomeUnknown):
                return False
            if replies != [token.encode()]:
                wrong.append((token, replies))
            return True

        try:
            assert await echo("warm")
            with stopped(private_redis):
                with pytest.raises(OutcomeUnknown) as err:  # the deadline, with the replies still owed
                    await batcher.execute(("ECHO", "first"), ("ECHO", "first-too"))
                assert err.value.reason is Unknown.LOST
                probe = await let_through(batcher, ("ECHO", "probe"))
                await until(lambda: in_flight(batcher._link.inner), "the probe written")
            await echo("probe", probe)
            # and everything after: many requests at once, each with its own token
            for round_ in range(50):
                answered = await asyncio.gather(*(echo(f"r{round_}-{i}") for i in range(100)))
                if all(answered):
                    break
                await asyncio.sleep(0.05)  # the breaker probes again on its own interval
            else:
                raise AssertionError("the batcher never recovered after the stall")
            assert wrong == [], f"replies handed to the wrong request: {wrong[:5]}"
        finally:
            await batcher.close()
            await client.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_of_the_wrong_shape_fails_its_round_trip_and_drops_the_connection(
    loop: str, private_redis: PrivateRedis
):
    async def main() -> None:
        client = await up(private_redis.url)
        batcher = RedisBatcher(client)
        try:
            (before,) = await batcher.execute(("CLIENT", "ID"))
            bad = asyncio.ensure_future(batcher.execute(("ECHO", "x"), check=lambda r: r == [b"y"]))
            beside = asyncio.ensure_future(batcher.execute(("ECHO", "beside")))  # the same round trip
            for task in (bad, beside):
                with pytest.raises(OutcomeUnknown) as err:  # never handed out
                    await task
                assert err.value.reason is Unknown.REPLY
            (after,) = await (await let_through(batcher, ("CLIENT", "ID")))
            assert after != before  # a new connection
        finally:
            await batcher.close()
            await client.aclose()

    run(loop, main)


def test_a_verdict_of_the_wrong_shape_is_a_redis_error_not_an_index_error(private_redis: PrivateRedis):
    async def main() -> None:
        client = await up(private_redis.url)
        batcher = RedisBatcher(client)
        limiter = RateLimiter(batcher, "t", limit=5)
        try:
            (reply,) = await batcher.execute(limiter.command("rl"), check=limiter.check)
            assert limiter.verdict(reply).allowed and well_formed(reply)
            for impossible in (b"OK", [1, 2], [b"1", 2, 3], 7, None):  # another command's replies
                with pytest.raises(OutcomeUnknown) as err:
                    limiter.verdict(impossible)
                assert err.value.reason is Unknown.REPLY
                assert not well_formed(impossible)
            assert not well_formed([1, 4, 0, 1])  # SLIDING_WINDOW answers exactly three
            assert well_formed([1, 4, 0, 1, b"v", None], flags=1, values=2)
            assert not well_formed([1, 4, 0, 1, b"v"], flags=1, values=2)
        finally:
            await batcher.close()
            await client.aclose()

    asyncio.run(main())


def test_a_forgotten_script_rerun_for_a_durable_request_ends_with_its_own_wait(private_redis: PrivateRedis):
    async def main() -> None:
        client = await up(private_redis.url)
        # replicas:1 on a server without replicas: every WAIT answers 0, so it shows on each request
        batcher = RedisBatcher(client, durability=Durability(replicas=1, wait_ms=20))
        append = batcher.script("return redis.call('XADD', KEYS[1], '*', 'f', ARGV[1])")
        note = batcher.script("return redis.call('SET', KEYS[1], ARGV[1])")

        async def waits() -> int:
            stats = await client.info("commandstats")
            return int(stats.get("cmdstat_wait", {}).get("calls", 0))

        try:
            await client.config_resetstat()
            # never loaded: NOSCRIPT, then the rerun, which appends the event
            with pytest.raises(OutcomeUnknown) as err:
                await batcher.execute(("EVALSHA", append, 1, "s", "e1"), durable=True)
            assert err.value.reason is Unknown.UNCONFIRMED
            assert len(err.value.replies) == 1 and isinstance(err.value.replies[0], bytes)
            assert await client.xlen("s") == 1
            assert await waits() == 2  # the round trip's WAIT, and the rerun's own
            await client.script_flush()
            # a request that writes no event: its rerun waits for nothing
            assert await batcher.execute(("EVALSHA", note, 1, "n", "v")) == [b"OK"]
            assert await waits() == 2
        finally:
            await batcher.close()
            await client.aclose()

    asyncio.run(main())
