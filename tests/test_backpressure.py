"""Backpressure at the edge: nothing waits on Redis past REFSTREAM_REDIS_DEADLINE_MS, the
queue is bounded, and while Redis is known down requests fail at once (one probe per
interval finds it back). Then the routes: with Redis gone, blackholed or full, public routes
answer 2xx from the spool (rate limits fail open), keyed routes 503 with Retry-After.

The time bounds asserted are correctness bounds (an answer within the deadline plus a
margin, instead of a pile-up of connect timeouts), not speed measurements."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.settings import Settings
from ingest.edge.batcher import Backpressure, RedisBatcher, RedisDown
from ingest.link import breaker as breaker_module

from ._procs import Procs
from ._proxy import Proxy
from .conftest import wait_for
from .faults._servers import FaultRedis

# a Redis of its own behind a proxy:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = pytest.mark.once

DEADLINE_S = 0.3
MARGIN_S = 0.5


async def timed(coro) -> tuple[float, object]:
    start = time.monotonic()
    try:
        out: object = await coro
    except (NotSent, OutcomeUnknown) as exc:  # the batcher's errors are the tree's
        out = exc
    return time.monotonic() - start, out


async def test_a_blackholed_redis_is_answered_within_the_deadline(settings: Settings, monkeypatch):
    # the first probe 0.5 s after the breaker opens, not 50 ms: the twenty refusals below
    # must come before it on a machine that may pause this process for tens of ms (a probe
    # into the blackhole waits out the deadline, and the next caller may probe again)
    monkeypatch.setattr(breaker_module, "PROBE_FIRST_S", 0.5)
    port = aioredis.Redis.from_url(settings.redis_url).connection_pool.connection_kwargs["port"]
    proxy = Proxy(port)
    await proxy.start()
    client = aioredis.Redis.from_url(proxy.url)
    batcher = RedisBatcher(client, deadline_s=DEADLINE_S)
    key = f"{settings.stream_prefix}:bp"
    try:
        assert await batcher.execute(("GET", key)) == [None]
        proxy.blackhole()
        # a burst while nothing answers: every request hears back within the deadline
        outcomes = await asyncio.gather(*(timed(batcher.execute(("GET", key))) for _ in range(200)))
        assert all(isinstance(out, NotSent | OutcomeUnknown) for _, out in outcomes), outcomes[:3]
        assert max(s for s, _ in outcomes) < DEADLINE_S + MARGIN_S
        assert any(isinstance(out, OutcomeUnknown) and out.reason is Unknown.LOST for _, out in outcomes)
        # known down: refused without waiting (a probe may be let through: at most one)
        refusals = [await timed(batcher.execute(("GET", key))) for _ in range(20)]
        assert sum(isinstance(out, RedisDown) for _, out in refusals) >= 19
        assert batcher.down.open

        proxy.heal()

        async def back() -> bool:
            try:
                return await batcher.execute(("GET", key)) == [None]
            except (NotSent, OutcomeUnknown):
                return False

        await wait_for(back, timeout=10, what="a probe to find Redis back")
        assert not batcher.down.open

        # something else reached Redis (the spool's drain): the next call probes at once,
        # rather than after an interval that has grown to a second
        proxy.blackhole()
        while not batcher.down.open:
            await timed(batcher.execute(("GET", key)))

        async def slot() -> bool:
            return batcher.down.allow()

        for _ in range(3):  # grow the interval to its cap, a second: these probe slots go unused
            await wait_for(slot, timeout=5, what="a probe slot")
        proxy.heal()
        assert isinstance((await timed(batcher.execute(("GET", key))))[1], RedisDown)
        batcher.down.probe_now()
        assert await batcher.execute(("GET", key)) == [None]
        assert not batcher.down.open
    finally:
        await batcher.close()
        await client.aclose()
        await proxy.close()


async def test_the_queue_is_bounded(settings: Settings):
    port = aioredis.Redis.from_url(settings.redis_url).connection_pool.connection_kwargs["port"]
    proxy = Proxy(port)
    await proxy.start()
    client = aioredis.Redis.from_url(proxy.url)
    # a deadline of 3 s: the first round trip must still hang (not have failed and emptied
    # the queue) when the last request is refused, on a machine that may pause this process
    batcher = RedisBatcher(client, deadline_s=3.0, max_queued=10, max_commands=4)
    get = ("GET", f"{settings.stream_prefix}:bp")
    try:
        with pytest.raises(Backpressure):
            await batcher.execute(*[get] * 11)  # more than the queue holds
        proxy.blackhole()
        # 4 commands go out (and hang), 8 wait behind them; the next 4 would make 12 queued
        first = asyncio.create_task(batcher.execute(*[get] * 4))

        async def sent() -> bool:  # the flusher took them
            return batcher._task is not None and not batcher._queued

        await wait_for(sent, timeout=5, what="the first round trip")
        behind = [asyncio.create_task(batcher.execute(*[get] * 4)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Backpressure):
            await batcher.execute(*[get] * 4)
        for task in (first, *behind):
            with pytest.raises((NotSent, OutcomeUnknown)):
                await task
    finally:
        proxy.heal()
        await batcher.close()
        await client.aclose()
        await proxy.close()


async def test_an_answered_request_is_let_go_at_once_not_at_its_deadline(settings: Settings) -> None:
    """The batcher keeps each caller in its deadline queue only until answered: with a
    deadline of an hour, nothing is still held after the round trips (what it held was what
    the collector's young generation walked, ``ingest.contract.heap``)."""
    client = aioredis.Redis.from_url(settings.redis_url)
    batcher = RedisBatcher(client, deadline_s=3600.0, max_commands=4)
    get = ("GET", f"{settings.stream_prefix}:held")
    try:
        answers = await asyncio.gather(*[batcher.execute(get, get) for _ in range(10)])
        assert answers == [[None, None]] * 10
        assert not batcher._waiting
    finally:
        await batcher.close()
        await client.aclose()


# -- the routes --------------------------------------------------------------------------


async def world(procs: Procs) -> dict[str, str]:
    ws = await procs.cli("workspace", "create", "Acme")
    code = f"bp{secrets.token_hex(4)}"
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
    return {**ws, "code": code}


async def answers(base: str, ws: dict[str, str]) -> dict[str, tuple[int, str | None, float]]:
    """One request per route family: status, Retry-After and the seconds to the answer."""
    auth = {"Authorization": f"Bearer {ws['api_key']}"}
    code = ws["code"]
    calls = {
        "biore (public)": (f"/api/v1/referral/click/{code}", None, {}),
        "affitor (public)": ("/api/v1/track/click", {"affiliate_url": f"https://x.test/?aff={code}"}, {}),
        "bricqs convert (public)": ("/api/v1/referrals/convert", {"code": code, "referred_session_id": "s1"}, {}),
        "affixo (keyed)": ("/v1/track/click", {"ref": code}, auth),
        "refport lead (keyed)": (
            "/api/track/lead",
            {"clickId": "clk_x", "eventName": "Sign Up", "customerExternalId": "c1"},
            auth,
        ),
    }
    out = {}
    async with aiohttp.ClientSession() as http:
        for name, (path, body, headers) in calls.items():
            start = time.monotonic()
            async with http.post(base + path, json=body, headers=headers) as r:
                await r.read()
                out[name] = (r.status, r.headers.get("Retry-After"), time.monotonic() - start)
    return out


def check_degraded(got: dict[str, tuple[int, str | None, float]], bound_s: float) -> None:
    for name, (status, retry_after, seconds) in got.items():
        if "public" in name:
            assert status == 200, (name, got)
        else:
            assert (status, retry_after) == (503, "1"), (name, got)
        assert seconds < bound_s, (name, got)


@pytest.fixture
async def own_redis(tmp_path: Path):
    server = FaultRedis()
    server.start()
    await server.ready()
    yield server
    server.destroy()


async def test_routes_with_redis_blackholed_and_gone(settings: Settings, own_redis: FaultRedis, tmp_path: Path):
    proxy = Proxy(own_redis.port)
    await proxy.start()
    procs = Procs(settings.model_copy(update={"redis_url": proxy.url}), tmp_path)
    try:
        ws = await world(procs)
        base = await procs.start_edge(REFSTREAM_REDIS_DEADLINE_MS="1000")
        proxy.blackhole()
        # the first request meets the blackhole (1 s), the later ones a Redis known down.
        # Without the deadline a request would wait out the socket timeout (5 s); the margin
        # is for a public route's spool write (an fsync) on a loaded machine: 2.65 s was seen
        # with the three suites of scripts/test running at once
        bound_s = 1.0 + 2.5
        check_degraded(await answers(base, ws), bound_s)
        check_degraded(await answers(base, ws), bound_s)
        proxy.heal()
        own_redis.kill()  # refused outright now
        check_degraded(await answers(base, ws), bound_s)
    finally:
        procs.stop_all()
        await proxy.close()


async def test_public_routes_fail_open_on_a_full_redis(settings: Settings, tmp_path: Path):
    server = FaultRedis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    server.start()
    await server.ready()
    procs = Procs(settings.model_copy(update={"redis_url": server.url}), tmp_path)
    admin = aioredis.Redis.from_url(server.url)
    try:
        ws = await world(procs)
        base = await procs.start_edge()

        async def full() -> bool:
            try:
                await admin.append("filler", b"\0" * 64 * 1024)
                return False
            except aioredis.ResponseError:
                return True

        await wait_for(full, timeout=30, what="Redis to fill up")
        # the rate-limit script is refused (OOM): public routes let the request through
        # and spool the event; keyed routes cannot tell who is over their limit: 503
        got = await answers(base, ws)
        assert got["biore (public)"][0] == 200, got
        assert got["bricqs convert (public)"][0] == 200, got
        assert got["affixo (keyed)"][:2] == (503, "1"), got
    finally:
        procs.stop_all()
        await admin.aclose()
        server.destroy()
