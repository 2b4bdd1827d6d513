"""HEAD changes nothing. A mail scanner sends HEAD to every link before the person's GET:
``HEAD /r/{code}`` answered 302 and counted a click, so one person counted twice. Every
route the app answers GET on is asked HEAD here, found by walking the app's own router
(a route added later is asked too), against a real edge, Redis and Postgres: each is
answered as its GET is, and no Redis key (streams, rate limits, drop tallies, caches)
nor any affiliate's address changes."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge.state import EDGE

from ._world import BROWSER, World, start_edge
from .test_sales import affiliate_keys

SCANNER = "127.0.0.3"  # the HEADs come from an address nothing else used


def _samples(world: World) -> dict[str, str]:
    """A value for each path parameter, one that reaches the handler's own work (a name not
    listed here gets ``sample``)."""
    return {"code": world.link["code"], "id": world.link["id"], "external_id": "user_001", "participant_id": "user_123"}


def _get_paths(app: web.Application, world: World) -> list[str]:
    samples = _samples(world)
    paths = []
    for resource in app.router.resources():
        if any(route.method == "GET" for route in resource):
            paths.append(re.sub(r"\{(\w+)[^}]*\}", lambda m: samples.get(m[1], "sample"), resource.canonical))
    return sorted(paths)


async def _ask(method: str, url: str, headers: dict[str, str], source_ip: str) -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": BROWSER}) as http:
        async with http.request(method, url, headers=headers, allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.read()


async def _state(redis: Any, prefix: str) -> dict[bytes, bytes | None]:
    """Every key under the test's prefix with its value (DUMP: any type, byte for byte)."""
    return {key: await redis.dump(key) async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)}


async def test_head_on_every_get_route_is_answered_as_get_and_changes_nothing(
    settings: Settings, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
):
    mine, _ = await affiliate_keys(pg, redis, keys, world)
    runner, base = await start_edge(settings)
    edge = runner.app[EDGE]
    paths = _get_paths(runner.app, world)
    assert {"/r/PARTNER123", "/api/v1/referrals/validate/PARTNER123", "/v1/affiliate/links"} <= set(paths)

    def headers(path: str) -> dict[str, str]:
        key = mine["api_key"] if path.startswith("/v1/affiliate/") else world.api_key
        return {"Authorization": f"Bearer {key}", "X-API-Key": key}

    try:
        # GET first: what it answers, and the caches it fills (a HEAD may read them)
        got = {path: await _ask("GET", base + path, headers(path), "127.0.0.1") for path in paths}
        assert got["/r/PARTNER123"][0] == 302 and got["/v1/affiliate/links"][0] == 200
        await edge.drops.flush()
        before = await _state(redis, settings.stream_prefix)
        for path in paths:
            status, hdrs, body = await _ask("HEAD", base + path, headers(path), SCANNER)
            assert status == got[path][0], path
            assert hdrs.get("Content-Type") == got[path][1].get("Content-Type"), path
            assert body == b"" and "Set-Cookie" not in hdrs, path
        _, redirected, _ = await _ask("HEAD", base + "/r/PARTNER123", {}, SCANNER)
        assert redirected["Location"] == world.link["url"]  # nothing recorded: no click id to append
    finally:
        await runner.cleanup()  # the drop tally's last flush
    after = await _state(redis, settings.stream_prefix)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == set()
    assert await pg.fetchval("SELECT count(*) FROM affiliate_ips WHERE ip = $1::inet", SCANNER) == 0


async def test_the_person_after_the_scanner_counts_once(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
):
    """The report: a scanner's HEAD, then the person's GET, is one click."""
    assert (await _ask("HEAD", f"{edge}/r/PARTNER123", {}, SCANNER))[0] == 302
    status, hdrs, _ = await _ask("GET", f"{edge}/r/PARTNER123", {}, "127.0.0.1")
    assert status == 302 and "refstream_click_id=clk_" in hdrs["Location"] and "Set-Cookie" in hdrs
    assert (await drain())["inserted"] == 1
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 1
