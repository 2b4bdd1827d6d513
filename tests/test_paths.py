"""One path rule for every route (``ingest.host.paths``): a trailing slash, or a doubled
one, reaches the route the path without it reaches, on every method, a POST included
(resolved inside the edge: SDKs do not follow a redirect on POST); what no spelling
matches is a JSON 404 (405 with ``Allow``). Beside it, the other spellings peers send:
a percent-encoded code, and ``navigator.sendBeacon``'s ``text/plain`` body or a charset on
the content type. Against a real edge, Redis and Postgres; the routes are found by walking
the app's own router, so a route added later is held to the rule too."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._world import BROWSER, World, start_edge
from .test_e2e import TRACKED


async def _send(
    method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str | None, Any, dict[str, str]]:
    """One request, not following redirects: status, content type, the body (parsed where
    it is JSON), headers."""
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        async with http.request(method, url, data=body, headers=headers, allow_redirects=False) as r:
            raw = await r.read()
            parsed = orjson.loads(raw) if raw and r.content_type == "application/json" else raw
            return r.status, r.content_type, parsed, dict(r.headers)


def _shape(answer: tuple[int, str | None, Any, dict[str, str]]) -> tuple[Any, ...]:
    """What tells one route's answer from another's: status, content type, the body's keys
    (an error's code too), and the rate-limit and redirect headers."""
    status, ctype, body, headers = answer
    keys = sorted(body) if isinstance(body, dict) else type(body).__name__
    error = body.get("error") if isinstance(body, dict) else None
    location = re.sub(r"clk_[0-9a-f]+", "clk", headers.get("Location", ""))
    return status, ctype, keys, error, "X-RateLimit-Limit" in headers, location


def _routes(app: web.Application, world: World) -> list[tuple[str, str]]:
    samples = {"code": world.link["code"], "id": world.link["id"], "external_id": "user_001"}
    out = set()
    for route in app.router.routes():
        assert route.resource is not None
        path = re.sub(r"\{(\w+)[^}]*\}", lambda m: samples.get(m[1], "sample"), route.resource.canonical)
        out.add((route.method, path))
    return sorted(out)


async def test_every_route_answers_the_same_with_a_trailing_or_doubled_slash(
    settings: Settings, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
):
    runner, base = await start_edge(settings)
    key = {"Authorization": f"Bearer {world.api_key}", "X-API-Key": world.api_key}
    try:
        routes = _routes(runner.app, world)
        assert len(routes) > 40 and ("POST", "/api/track/sale") in routes and ("GET", "/r/PARTNER123") in routes
        for method, path in routes:
            body = b"{}" if method in ("POST", "PATCH") else None
            plain = _shape(await _send(method, base + path, body=body, headers=key))
            for spelling in (path + "/", path.replace("/", "//", 1), path + "//"):
                answer = _shape(await _send(method, base + spelling, body=body, headers=key))
                assert answer == plain, (method, spelling)
            # the route's own answer, not the router's
            assert (plain[2], plain[3]) not in ((["error"], "not_found"), (["error"], "method_not_allowed")), path
    finally:
        await runner.cleanup()


async def test_a_redirect_link_with_a_trailing_slash_counts_and_an_unknown_one_lands_on_the_fallback(
    edge: str, world: World, drain
):
    status, _, _, headers = await _send("GET", f"{edge}/r/PARTNER123/")
    assert status == 302 and headers["Location"].startswith("https://yoursite.com/pricing?refstream_click_id=clk_")
    assert "Set-Cookie" in headers
    status, _, _, headers = await _send("GET", f"{edge}/r/no-such-code/")
    assert (status, headers["Location"]) == (302, "/")  # REFSTREAM_FALLBACK_URL
    assert (await drain())["inserted"] == 1


async def test_a_post_with_a_trailing_slash_is_taken_not_redirected(edge: str, world: World, drain):
    """httpx and aiohttp's clients do not follow a redirect on POST: the slash is resolved
    inside the edge, the click counted, and a preflight on it answered."""
    status, _, body, _ = await _send("POST", f"{edge}/api/v1/referral/click/PARTNER123/")
    assert (status, body) == (200, TRACKED)
    asked = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
    status, _, _, headers = await _send("OPTIONS", f"{edge}/api/v1/referral/click/PARTNER123/", headers=asked)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert (await drain())["inserted"] == 1


async def test_what_matches_no_route_is_a_json_404_or_405(edge: str):
    assert (await _send("GET", f"{edge}/nope"))[:3] == (404, "application/json", {"error": "not_found"})
    assert (await _send("GET", f"{edge}/nope/"))[:3] == (404, "application/json", {"error": "not_found"})
    assert (await _send("GET", f"{edge}/r/"))[:3] == (404, "application/json", {"error": "not_found"})
    status, ctype, body, headers = await _send("POST", f"{edge}/healthz/")
    assert (status, ctype, body) == (405, "application/json", {"error": "method_not_allowed"})
    assert set(headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


async def test_a_percent_encoded_code_is_the_code(edge: str, world: World, pg: asyncpg.Pool, drain):
    status, _, _, headers = await _send("GET", f"{edge}/r/PARTNER%31%32%33")
    assert status == 302 and "refstream_click_id=clk_" in headers["Location"]
    status, _, body, _ = await _send("POST", f"{edge}/api/v1/referral/click/%50ARTNER123")
    assert (status, body) == (200, TRACKED)
    assert (await drain())["inserted"] == 2
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 2


async def test_a_beacons_text_plain_body_and_a_charset_are_json_all_the_same(edge: str, world: World, drain):
    """``navigator.sendBeacon(url, JSON.stringify(…))`` sends ``text/plain;charset=UTF-8``
    (no preflight); a server SDK may name a charset. The public and keyed routes read the
    body as JSON whatever the type says."""
    beacon = {"Content-Type": "text/plain;charset=UTF-8"}
    click = orjson.dumps({"affiliate_url": "https://yoursite.com/?aff=PARTNER123"})
    status, _, body, _ = await _send("POST", f"{edge}/api/v1/track/click", body=click, headers=beacon)
    assert status == 200 and body["click_id"].startswith("clk_")
    convert = orjson.dumps({"code": "PARTNER123", "referred_session_id": "sess_beacon"})
    status, _, body, _ = await _send("POST", f"{edge}/api/v1/referrals/convert", body=convert, headers=beacon)
    assert status == 200 and body["converted"] is True
    charset = {"Content-Type": "application/json; charset=utf-8", "Authorization": f"Bearer {world.api_key}"}
    status, _, body, _ = await _send(
        "POST", f"{edge}/v1/track/click", body=orjson.dumps({"ref": "PARTNER123"}), headers=charset
    )
    assert status == 200, body
    assert (await drain())["inserted"] == 3


def test_the_rule_keeps_escapes_and_the_root():
    from ingest.host.paths import canonical

    assert canonical("/r/demo/") == "/r/demo"
    assert canonical("//r//caf%C3%A9//") == "/r/caf%C3%A9"
    assert canonical("/r/a%2F/") == "/r/a%2F"
    assert canonical("/") is None and canonical("/r/demo") is None
    assert canonical("///") == "/"
