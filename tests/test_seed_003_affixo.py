"""Seed 003 (Affixo) ``POST /v1/track/click``: Bearer keys and scopes, the OpenAPI's error
codes, the per-key rate limit, visitor matching, and what a drain stores."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin

from ._world import World, call, make_world, start_edge


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def click(edge: str, key: str | None, body: object, **kw) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = bearer(key) if key else {}
    return await call("POST", f"{edge}/v1/track/click", json=body, headers=headers, **kw)


async def test_example_with_a_visitor_id(edge: str, world: World, pg: asyncpg.Pool, drain):
    body = {"ref": "PARTNER123", "visitor_id": "vis_42", "url": "https://yoursite.com/", "referrer": "https://t.co/x"}
    status, out, headers = await click(edge, world.api_key, body)
    assert (status, out) == (
        200,
        {"ok": True, "visitor_id": "vis_42", "match_method": "cookie", "match_confidence": 1.0},
    )
    assert headers["X-RateLimit-Limit"] == "600"
    await drain()
    event = await pg.fetchrow("SELECT * FROM events")
    assert (event["dialect"], event["visitor_id"], event["referrer"]) == ("affixo", "vis_42", "https://t.co/x")
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 1
    assert await pg.fetchval("SELECT status FROM customers WHERE visitor_id = 'vis_42'") == 1


async def test_fingerprint_matching(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys, drain):
    _, first, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": "fp-abc"})
    assert first["match_method"] == "new" and first["match_confidence"] == 0.0
    _, again, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": "fp-abc"})
    assert again["visitor_id"] == first["visitor_id"]
    assert again["match_method"] == "fingerprint" and 0 < again["match_confidence"] < 1
    # a fingerprint met with a known visitor id is remembered for that visitor
    await click(edge, world.api_key, {"ref": "PARTNER123", "visitor_id": "vis_7", "fingerprint": "fp-xyz"})
    _, later, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": "fp-xyz"})
    assert (later["visitor_id"], later["match_method"]) == ("vis_7", "fingerprint")
    _, neither, _ = await click(edge, world.api_key, {"ref": "PARTNER123"})
    assert neither["match_method"] == "new" and neither["visitor_id"] not in (first["visitor_id"], "vis_7")
    # another workspace has never seen fp-abc
    other = await make_world(pg, redis, keys, code="OTHERWS", name="Other")
    _, elsewhere, _ = await click(edge, other.api_key, {"ref": "OTHERWS", "fingerprint": "fp-abc"})
    assert elsewhere["match_method"] == "new" and elsewhere["visitor_id"] != first["visitor_id"]
    await drain()
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 5
    assert await pg.fetchval("SELECT count(*) FROM customers WHERE workspace_id = $1", world.workspace_id) == 3


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer rs_live_nope", "Basic abc", "bearer  "])
async def test_unauthorized(edge: str, world: World, header):
    headers = {"Authorization": header} if header else {}
    status, out, _ = await call("POST", f"{edge}/v1/track/click", json={"ref": "PARTNER123"}, headers=headers)
    assert (status, out) == (401, {"error": "unauthorized"})


async def test_insufficient_scope(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    async with pg.acquire() as conn:
        read_only = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read", "write"])
        affiliate = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["*"], affiliate_id=world.affiliate_id
        )
        tracker = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["track"])
    for key in (read_only["api_key"], affiliate["api_key"]):
        status, out, _ = await click(edge, key, {"ref": "PARTNER123"})
        assert (status, out) == (403, {"error": "insufficient_scope", "need": "track"})
    assert (await click(edge, tracker["api_key"], {"ref": "PARTNER123"}))[0] == 200


@pytest.mark.parametrize(
    "data", [b"{oops", b"[]", b"{}", b'{"ref": ""}', b'{"ref": 5}', b'{"ref": "' + b"x" * 200 + b'"}']
)
async def test_invalid_json(edge: str, world: World, data: bytes):
    status, out, _ = await call("POST", f"{edge}/v1/track/click", data=data, headers=bearer(world.api_key))
    assert status == 400 and out["error"] == "invalid_json" and out["detail"]


async def test_link_not_found_missing_or_in_another_workspace(edge: str, world: World, pg, redis, keys: Keys):
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    for key, ref in ((world.api_key, "NOPE"), (world.api_key, "THEIRS"), (other.api_key, "PARTNER123")):
        status, out, _ = await click(edge, key, {"ref": ref})
        assert (status, out) == (404, {"error": "link_not_found"}), (key, ref)
    assert sum([await redis.xlen(s) for s in keys.streams]) == 0


async def test_rate_limit_per_key(settings: Settings, world: World, pg, redis, keys: Keys):
    runner, edge = await start_edge(settings.model_copy(update={"key_rate_limit_per_min": 5}))
    try:
        async with pg.acquire() as conn:
            second = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["track"])
        for _ in range(5):
            assert (await click(edge, world.api_key, {"ref": "PARTNER123"}))[0] == 200
        status, out, headers = await click(edge, world.api_key, {"ref": "PARTNER123"})
        assert status == 429 and out["error"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1 and headers["X-RateLimit-Remaining"] == "0"
        # per key, not per IP: another key from the same address goes through
        assert (await click(edge, second["api_key"], {"ref": "PARTNER123"}))[0] == 200
    finally:
        await runner.cleanup()
