"""POST /v1/events/batch: many events per request, each validated like its single-event
route, one result per event; JSON arrays and NDJSON, gzip accepted."""

from __future__ import annotations

import gzip

import asyncpg
import orjson

from ingest.contract.keys import Keys
from ingest.manage import admin

from ._world import ENRICHMENT, World, call
from .test_seed_002_affitor import EXAMPLE as CLICK

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def test_mixed_batch_with_per_event_results(edge: str, world: World, pg: asyncpg.Pool, drain):
    click_id = (await call("POST", f"{edge}/api/v1/track/click", json=CLICK))[1]["click_id"]
    items = [
        {"type": "click", "ref": "PARTNER123", "visitor_id": "v1", "ip": "81.2.69.160", "user_agent": CHROME},
        {"type": "click", "ref": "PARTNER123", "fingerprint": "fp-1"},
        {"type": "click", "ref": "PARTNER123", "fingerprint": "fp-1"},
        {"type": "lead", "clickId": click_id, "eventName": "Sign Up", "customerExternalId": "u1"},
        {"type": "conversion", "code": "PARTNER123", "referred_session_id": "s1"},
        {"type": "signup"},
        {"type": "lead", "clickId": click_id},
        {"type": "click", "ref": "NOPE"},
        {"type": "lead", "clickId": "clk_" + "0" * 32, "eventName": "x", "customerExternalId": "u2"},
        "not an object",
    ]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=items, headers=auth(world.api_key))
    assert status == 200 and (out["accepted"], out["rejected"]) == (5, 5)
    r = out["results"]
    assert [x["index"] for x in r] == list(range(10)) and [x["ok"] for x in r] == [True] * 5 + [False] * 5
    assert (r[0]["visitor_id"], r[0]["match_method"], r[0]["match_confidence"]) == ("v1", "cookie", 1.0)
    assert r[1]["match_method"] == "new"
    assert (r[2]["visitor_id"], r[2]["match_method"]) == (r[1]["visitor_id"], "new")  # same batch: the same new visitor
    assert [x["error"] for x in r[5:]] == ["invalid", "invalid", "link_not_found", "invalid_click_id", "invalid"]
    assert "eventName" in r[6]["detail"]

    await drain()
    link = await pg.fetchrow("SELECT clicks, leads, conversions FROM links WHERE code = 'PARTNER123'")
    assert tuple(link) == (4, 1, 1)  # the Affitor click and three batch clicks
    assert {str(e["event_id"]) for e in await pg.fetch("SELECT event_id FROM events WHERE dialect = 'native'")} == {
        x["event_id"] for x in r[:5]
    }
    enriched = await pg.fetchrow(f"SELECT country, {ENRICHMENT} AS enrichment FROM events WHERE visitor_id = 'v1'")
    assert enriched["country"] == "GB" and enriched["enrichment"]["browser"] == "Chrome"


async def test_ndjson_gzip_and_the_fingerprint_across_requests(edge: str, world: World):
    lines = b"\n".join(orjson.dumps({"type": "click", "ref": "PARTNER123", "fingerprint": "fp-9"}) for _ in range(2))
    headers = auth(world.api_key, **{"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=gzip.compress(lines), headers=headers)
    assert status == 200 and out["accepted"] == 2
    status, again, _ = await call(
        "POST",
        f"{edge}/v1/events/batch",
        headers=auth(world.api_key),
        json=[{"type": "click", "ref": "PARTNER123", "fingerprint": "fp-9"}],
    )
    assert again["results"][0]["match_method"] == "fingerprint"
    assert again["results"][0]["visitor_id"] == out["results"][0]["visitor_id"]


async def test_whole_request_errors(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    url = f"{edge}/v1/events/batch"
    one = {"type": "click", "ref": "PARTNER123"}
    assert (await call("POST", url, json=[one]))[:2] == (401, {"error": "unauthorized"})
    async with pg.acquire() as conn:
        reader = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    status, out, _ = await call("POST", url, json=[one], headers=auth(reader["api_key"]))
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "track"})
    h = auth(world.api_key)
    assert (await call("POST", url, json=[one] * 501, headers=h))[1]["error"] == "too_many_events"
    assert (await call("POST", url, json={"type": "click"}, headers=h))[:2][0] == 400
    assert (await call("POST", url, data=b"[{", headers=h))[1]["error"] == "invalid_json"
    assert (await call("POST", url, json=[], headers=h))[0] == 400
    big = [{"type": "click", "ref": "PARTNER123", "url": "https://x.test/" + "a" * 2000, "referrer": "r" * 2000}] * 500
    assert (await call("POST", url, json=big, headers=h))[:2][0] == 413  # over the 1 MiB cap
    assert sum([await redis.xlen(s) for s in keys.streams]) == 0
