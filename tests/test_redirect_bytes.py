"""A destination keeps its bytes: ``/r/{code}`` answers the link's URL exactly as stored,
with only ``&refstream_click_id=<id>`` (``?…`` where it has no query) appended before any
``#fragment``; a ``Location`` carries only what a header may, each other byte
percent-encoded, never a 500. The same for every other door that hands a caller's URL
back or on: the rate-limited and fallback redirects, Bricqs' referral URL (a webhook's
target: tests/test_webhooks.py). Against a real edge, Redis and Postgres."""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import asyncpg
from hypothesis import example, given
from hypothesis import strategies as st

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.urls import header_safe, with_param
from ingest.manage import admin

from ._world import BROWSER, World, start_edge

PARAM = "refstream_click_id"
# (the link's URL as stored, the Location its click answers; {id} the click id)
DESTINATIONS = [
    ("https://shop.example.com/search?q=caf%E9", "https://shop.example.com/search?q=caf%E9&P={id}"),
    ("https://x.example/a%20b/c%2Fd?x=%20+y&p=%2F", "https://x.example/a%20b/c%2Fd?x=%20+y&p=%2F&P={id}"),
    ("https://x.example/?flag", "https://x.example/?flag&P={id}"),
    ("https://x.example/?a=1&flag&b=", "https://x.example/?a=1&flag&b=&P={id}"),
    ("https://x.example/p?a=1#frag?x&y=2", "https://x.example/p?a=1&P={id}#frag?x&y=2"),
    ("https://x.example/p#top", "https://x.example/p?P={id}#top"),
    ("https://x.example/?", "https://x.example/?P={id}"),
    ("https://x.example/p?a=1&", "https://x.example/p?a=1&P={id}"),
    ("https://x.example/p?q=a;b&r=%25%2B", "https://x.example/p?q=a;b&r=%25%2B&P={id}"),
    # a header is ASCII: each other character's UTF-8 bytes, percent-encoded; the rest as stored
    ("https://shop.example.com/café?q=é&r=%E9#ü", "https://shop.example.com/caf%C3%A9?q=%C3%A9&r=%E9&P={id}#%C3%BC"),
    # a URL stored before URLs were checked: no header of its own, never a 500
    ("https://x.example/a\r\nSet-Cookie: x=1", "https://x.example/a%0D%0ASet-Cookie:%20x=1?P={id}"),
]


async def _links(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, urls: list[str]) -> list[str]:
    codes = [f"dest{i}" for i in range(len(urls))]
    async with pg.acquire() as conn:
        for code, url in zip(codes, urls, strict=True):
            await admin.create_link(
                conn,
                redis,
                keys,
                workspace_id=world.workspace_id,
                code=code,
                url=url,
                program_id=world.program_id,
                affiliate_id=world.affiliate_id,
            )
    return codes


async def _go(method: str, url: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        async with http.request(method, url, allow_redirects=False) as r:
            await r.read()
            raw = dict(r.raw_headers).get(b"Location")
            return r.status, raw.decode("ascii") if raw is not None else None


async def test_a_redirect_answers_the_stored_url_with_only_the_click_id_appended(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
):
    codes = await _links(pg, redis, keys, world, [stored for stored, _ in DESTINATIONS])
    for code, (stored, expected) in zip(codes, DESTINATIONS, strict=True):
        status, location = await _go("GET", f"{edge}/r/{code}")
        assert status == 302 and location is not None, stored
        click_id = re.search(f"{PARAM}=(clk_[0-9a-f]+)", location)
        assert click_id is not None, location
        assert location == expected.replace("P=", f"{PARAM}=").format(id=click_id[1]), stored
        # HEAD: the link's destination, nothing appended (nothing was recorded)
        assert await _go("HEAD", f"{edge}/r/{code}") == (302, header_safe(stored))
    assert (await drain())["inserted"] == len(DESTINATIONS)


async def test_the_rate_limited_and_fallback_redirects_keep_their_bytes_too(
    settings: Settings, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
):
    fallback = "https://fallback.example/caf%E9/?x=%2F&flag&é#top"
    runner, base = await start_edge(
        settings.model_copy(update={"public_rate_limit_per_min": 1, "fallback_url": fallback})
    )
    try:
        (code,) = await _links(pg, redis, keys, world, ["https://x.example/ü?q=%20#f"])
        assert (await _go("GET", f"{base}/r/{code}"))[0] == 302  # the one the limit admits
        for method in ("GET", "HEAD"):
            assert await _go(method, f"{base}/r/{code}") == (302, "https://x.example/%C3%BC?q=%20#f"), method
            assert await _go(method, f"{base}/r/nosuchcode") == (
                302,
                "https://fallback.example/caf%E9/?x=%2F&flag&%C3%A9#top",
            )
    finally:
        await runner.cleanup()


async def test_bricqs_referral_url_keeps_the_programs_url(edge: str, world: World, pg: asyncpg.Pool):
    program_url = "https://shop.example.com/caf%C3%A9?q=a%20b&flag&ref=old#top"
    await pg.execute("UPDATE programs SET url = $1 WHERE id = $2", program_url, uuid.UUID(world.program_id))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{edge}/api/v1/referrals/generate",
            headers={"X-API-Key": world.api_key},
            json={"participant_id": "p-1", "campaign_id": world.program_id},
        ) as r:
            assert r.status in (200, 201)
            out = await r.json()
    # an older ref= goes (the tracker reads the first); every other byte is the program's
    assert out["referral_url"] == f"https://shop.example.com/caf%C3%A9?q=a%20b&flag&ref={out['code']}#top"


# a URL as a link may hold it: any characters, the delimiters often
_URLISH = st.text(st.sampled_from("ab/?#&=%;+ é\u00fc\U0001f600"), max_size=30).map(lambda s: "https://x.example/" + s)


@given(url=_URLISH, value=st.text(st.sampled_from("clk_0123456789abcdef"), min_size=1, max_size=12))
@example(url="https://x.example/?", value="clk_1")
@example(url="https://x.example/a?b#c?d#e", value="clk_1")
def test_appending_keeps_every_byte_of_the_url(url: str, value: str):
    """``with_param``'s result, less what it appended, is its input; the fragment stays last
    and whole; the query's last pair is the one appended."""
    out = with_param(url, PARAM, value)
    head, hash_, fragment = url.partition("#")
    assert out.endswith(hash_ + fragment)
    query_part = out[: len(out) - len(hash_ + fragment)]
    appended = f"{PARAM}={value}"
    assert query_part.endswith(appended)
    rest = query_part[: -len(appended)]
    assert rest in (head, head + "&", head + "?")  # the input, and one separator at most
    query = head.partition("?")[2] if "?" in head else None
    assert (rest == head + "?") == (query is None)  # a query begun only where there was none
    assert (rest == head + "&") == bool(query and not query.endswith("&"))  # "&" only where needed
    assert parse_qsl(query_part.split("?", 1)[1], keep_blank_values=True)[-1] == (PARAM, value)


@given(url=_URLISH)
def test_a_header_safe_url_is_ascii_and_changes_only_what_a_header_cannot_carry(url: str):
    safe = header_safe(url)
    assert safe.isascii() and safe.isprintable() and " " not in safe
    if url.isascii() and url.isprintable() and " " not in url:
        assert safe == url
