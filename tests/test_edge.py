"""The seed 000 route and the edge's own routes, against an in-process edge on a real port
with real Redis and Postgres. Requests come from distinct loopback addresses (127.0.0.1,
127.0.0.2), so per-IP limits are exercised on real sockets."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ingest.contract import links
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._procs import Procs
from ._world import BROWSER, call, start_edge
from .test_e2e import TRACKED
from .test_store import make_links


async def start(settings: Settings) -> tuple[web.AppRunner, str]:
    return await start_edge(settings)


async def click(base: str, code: str, *, source_ip: str = "127.0.0.1") -> tuple[int, dict[str, Any], dict[str, str]]:
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": BROWSER}) as http:
        async with http.post(f"{base}/api/v1/referral/click/{code}") as r:
            return r.status, orjson.loads(await r.read()), dict(r.headers)


async def stream_total(redis, keys: Keys) -> int:
    return sum([await redis.xlen(s) for s in keys.streams])


async def test_61st_request_in_a_minute_is_throttled_other_ips_are_not(edge: str, redis, keys: Keys, pg):
    await make_links(pg, redis, keys, "alice")
    for i in range(60):
        status, body, _ = await click(edge, "alice")
        assert (status, body) == (200, TRACKED), i
    status, body, headers = await click(edge, "alice")
    assert status == 429
    assert body == {"success": False, "error": {"statusCode": 429, "code": "throttle", "message": "Too Many Requests"}}
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["X-RateLimit-Remaining"] == "0"

    status, body, _ = await click(edge, "alice", source_ip="127.0.0.2")
    assert (status, body) == (200, TRACKED)
    # the throttled request was not enqueued; the 60 admitted and the other IP's were
    assert await stream_total(redis, keys) == 61


async def test_sliding_window_admits_again_once_the_oldest_request_leaves(settings: Settings, redis):
    from ingest.edge.batcher import RedisBatcher
    from ingest.edge.ratelimit import RateLimiter

    from .conftest import wait_for

    batcher = RedisBatcher(redis)
    # a window of 3 s: the five round trips below fit in it on a loaded machine too
    limiter = RateLimiter(batcher, "test", limit=3, window_ms=3000)
    key = f"{settings.stream_prefix}:rate:test:1.2.3.4"

    async def attempt(n: int) -> bool:
        (reply,) = await batcher.execute(limiter.command(key))
        return limiter.verdict(reply).allowed

    try:
        assert [await attempt(i) for i in range(4)] == [True, True, True, False]
        (reply,) = await batcher.execute(limiter.command(key))
        denied = limiter.verdict(reply)
        assert not denied.allowed and 0 < denied.retry_after_ms <= 3000
        counter = iter(range(100, 10_000))
        await wait_for(lambda: attempt(next(counter)), timeout=15, what="the window to slide")
    finally:
        await batcher.close()


async def test_kill_switch(edge: str, procs: Procs):
    assert (await procs.cli("feature", "disable", "referral"))["enabled"] is False
    status, body, _ = await click(edge, "alice")
    assert status == 503
    assert body["success"] is False
    assert body["error"]["code"] == "features.referral_disabled"

    await procs.cli("feature", "enable", "referral")
    status, body, _ = await click(edge, "alice")
    assert (status, body) == (200, TRACKED)


async def test_known_unknown_and_inactive_codes_are_answered_but_not_enqueued(edge: str, redis, keys: Keys, pg):
    await make_links(pg, redis, keys, "paused")
    await links.put_missing(redis, keys, "ghost")
    await pg.execute("UPDATE links SET status = 'inactive', updated_at = now()")
    paused = await links.fetch(pg, "paused")
    assert paused is not None and not paused.active
    await links.put(redis, keys, paused)
    for code in ("ghost", "paused", "x" * 300):
        assert (await click(edge, code))[:2] == (200, TRACKED)
    assert await stream_total(redis, keys) == 0
    # a code the cache does not know, while it is not warm: Postgres decides, and the
    # answer is cached either way
    assert (await click(edge, "fresh"))[:2] == (200, TRACKED)
    assert await stream_total(redis, keys) == 0
    assert links.decode(await redis.get(keys.link("fresh"))) is links.MISSING
    await pg.execute(
        "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)"
        " SELECT workspace_id, program_id, affiliate_id, 'direct', url FROM links LIMIT 1"
    )
    assert (await click(edge, "direct"))[:2] == (200, TRACKED)
    assert await stream_total(redis, keys) == 1
    assert isinstance(links.decode(await redis.get(keys.link("direct"))), links.LinkInfo)
    # once warm, a miss is an unknown code and Postgres is not asked
    await pg.execute(
        "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)"
        " SELECT workspace_id, program_id, affiliate_id, 'behind-the-cache', url FROM links LIMIT 1"
    )
    await redis.set(keys.links_warm, b"1")
    assert (await click(edge, "behind-the-cache"))[:2] == (200, TRACKED)
    assert await stream_total(redis, keys) == 1


async def test_redis_down_public_clicks_are_spooled_keyed_routes_refused(settings: Settings, pg, redis, keys: Keys):
    from pathlib import Path

    from ingest.spool import store as spool_store

    await make_links(pg, redis, keys, "alice")  # found through Postgres while Redis is down
    down = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "redis_socket_timeout_s": 1.0, "block_ms": 100}
    )
    runner, base = await start(down)
    try:
        status, body, _ = await click(base, "alice")
        assert (status, body) == (200, TRACKED)  # durable in the spool before the 200
        conn = spool_store.connect(Path(settings.spool_dir))
        spooled = spool_store.oldest(conn, 10)
        conn.close()
        assert len(spooled) == 1 and b'"code":"alice"' in spooled[0].envelope
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/v1/track/click", json={"ref": "alice"}, headers={"Authorization": "Bearer rs_live_x"}
            ) as r:
                assert (r.status, r.headers["Retry-After"]) == (503, "1")
            # the batch route's 503 in its own shape (it had no JSON content type)
            async with http.post(
                f"{base}/v1/events/batch",
                json=[{"type": "click", "code": "alice"}],
                headers={"Authorization": "Bearer rs_live_x"},
            ) as r:
                assert (r.status, r.headers["Retry-After"], r.content_type) == (503, "1", "application/json")
                assert await r.json() == {"error": "unavailable"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503
                body = await r.json()
                assert body["ready"] is False and body["redis"].startswith("error") and body["postgres"] == "ok"
    finally:
        await runner.cleanup()


async def test_readyz_reports_postgres(edge: str, settings: Settings):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/readyz") as r:
            assert (r.status, await r.json()) == (200, {"ready": True, "redis": "ok", "postgres": "ok"})
        async with http.get(f"{edge}/nope") as r:
            assert r.status == 404
    runner, base = await start(settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/x"}))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 503 and body["postgres"].startswith("error") and body["redis"] == "ok"
    finally:
        await runner.cleanup()


async def test_the_edge_settles_the_collector_once_started(settings: Settings, redis, pg) -> None:
    """Once its resources are made, the edge freezes what startup built and collects the
    youngest generation after ``EDGE_YOUNG`` new containers (ingest.contract.heap)."""
    import gc

    from ingest.contract import heap
    from ingest.host.app import EDGE_YOUNG

    from ._world import start_edge

    threshold = gc.get_threshold()
    heap.settle_once.cache_clear()
    gc.unfreeze()
    gc.set_threshold(700, *threshold[1:])
    try:
        assert gc.get_freeze_count() == 0
        runner, _ = await start_edge(settings)
        try:
            assert gc.get_threshold()[0] == EDGE_YOUNG and gc.get_freeze_count() > 1000
        finally:
            await runner.cleanup()
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_cors_a_preflight_says_what_may_be_sent_and_an_answer_what_may_be_read(edge: str, redis, keys, pg):
    """A public route's preflight (OPTIONS) is answered 204 with the methods, headers and
    lifetime a browser caches; the route's answers carry who may read them and which headers
    a script may read, and none of the preflight's own; a route that is not public carries
    no CORS header."""
    await make_links(pg, redis, keys, "cors")
    url = f"{edge}/api/v1/referral/click/cors"
    asked = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
    status, body, headers = await call("OPTIONS", url, headers=asked)
    assert (status, body) == (204, None)
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")
    assert "Content-Type" in headers["Access-Control-Allow-Headers"].replace(" ", "").split(",")
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert await stream_total(redis, keys) == 0  # a preflight tracks nothing

    status, body, headers = await call("POST", url, headers={"Origin": "https://shop.example"})
    assert (status, body) == (200, TRACKED)
    assert headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Retry-After", "Refstream-Outcome", "Refstream-Event-Id"} <= exposed
    assert not {"Access-Control-Allow-Methods", "Access-Control-Allow-Headers", "Access-Control-Max-Age"} & set(headers)
    assert await stream_total(redis, keys) == 1

    status, _, headers = await call("GET", f"{edge}/readyz", headers={"Origin": "https://shop.example"})
    assert status == 200 and not [h for h in headers if h.lower().startswith("access-control-")]
