"""Seed 001 (Bricqs) ``/api/v1/referrals``: generate, validate, convert, stats, with their
examples, auth and errors, and what a drain stores."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.manage import admin

from ._world import World, call, make_world


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


async def generate(edge: str, key: str, participant: str, campaign: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    return await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        headers=api_key(key),
        json={"participant_id": participant, "campaign_id": campaign},
    )


async def test_generate_is_idempotent_per_participant_and_campaign(edge: str, world: World, pg: asyncpg.Pool):
    status, out, _ = await generate(edge, world.api_key, "alex_new", world.program_id)
    assert status == 200
    assert set(out) == {"code", "referral_url", "participant_id", "created_at"}
    assert re.fullmatch(r"ALEXNEW[A-Z2-9]{4}", out["code"])
    assert out["referral_url"] == f"https://yoursite.com/?ref={out['code']}"
    assert out["participant_id"] == "alex_new" and out["created_at"].endswith("Z")
    again = await generate(edge, world.api_key, "alex_new", world.program_id)
    assert again[:2] == (200, out)
    # the existing participant of the world already has PARTNER123 in this campaign
    assert (await generate(edge, world.api_key, "user_123", world.program_id))[1]["code"] == "PARTNER123"
    affiliate = await pg.fetchrow("SELECT id, program_id FROM affiliates WHERE external_id = 'alex_new'")
    assert str(affiliate["program_id"]) == world.program_id
    assert await pg.fetchval("SELECT count(*) FROM links WHERE affiliate_id = $1", affiliate["id"]) == 1


async def test_concurrent_generates_make_one_code(edge: str, world: World, pg: asyncpg.Pool):
    results = await asyncio.gather(*(generate(edge, world.api_key, "racer", world.program_id) for _ in range(8)))
    assert {r[0] for r in results} == {200}
    assert len({r[1]["code"] for r in results}) == 1
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM links l JOIN affiliates a ON a.id = l.affiliate_id WHERE a.external_id = 'racer'"
        )
        == 1
    )


async def test_generate_errors(edge: str, world: World, pg, redis, keys: Keys):
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    status, out, _ = await generate(edge, world.api_key, "u", other.program_id)
    assert status == 404 and out["error"] == "campaign_not_found"
    status, out, _ = await generate(edge, world.api_key, "u", "550e8400-e29b-41d4-a716-446655440000")
    assert status == 404 and out["error"] == "campaign_not_found"
    status, out, _ = await generate(edge, world.api_key, "u", "not-a-uuid")
    assert status == 400 and out["error"] == "validation_error" and "campaign_id" in out["message"]
    status, out, _ = await call("POST", f"{edge}/api/v1/referrals/generate", json={"participant_id": "u"})
    assert (status, out["error"]) == (401, "unauthorized")
    async with pg.acquire() as conn:
        reader = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    status, out, _ = await generate(edge, reader["api_key"], "u", world.program_id)
    assert (status, out["error"]) == (403, "insufficient_scope")


async def test_validate(edge: str, world: World):
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/validate/PARTNER123")
    assert (status, out) == (
        200,
        {"valid": True, "code": "PARTNER123", "referrer_id": "user_123", "campaign_id": world.program_id},
    )
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/validate/NOPE")
    assert (status, out) == (200, {"valid": False, "code": "NOPE", "referrer_id": None, "campaign_id": None})
    # a code generated a moment ago validates at once: the write refreshed the cache
    code = (await generate(edge, world.api_key, "fresh", world.program_id))[1]["code"]
    assert (await call("GET", f"{edge}/api/v1/referrals/validate/{code}"))[1]["valid"] is True


async def test_convert_is_idempotent_per_code_and_session(edge: str, world: World, pg: asyncpg.Pool, drain):
    body = {"code": "PARTNER123", "referred_session_id": "sess_newuser_456"}
    status, out, _ = await call("POST", f"{edge}/api/v1/referrals/convert", json=body)
    assert status == 200
    assert out["converted"] is True and out["referrer_id"] == "user_123"
    assert re.fullmatch(r"conv_[0-9a-f]{32}", out["conversion_id"])
    again = await call("POST", f"{edge}/api/v1/referrals/convert", json=body)
    assert again[:2] == (200, out)
    other = await call("POST", f"{edge}/api/v1/referrals/convert", json={**body, "referred_session_id": "sess_2"})
    assert other[1]["conversion_id"] != out["conversion_id"]
    await drain()
    assert await pg.fetchval("SELECT conversions FROM links WHERE code = 'PARTNER123'") == 2
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 3") == 2
    customer = await pg.fetchrow("SELECT status, affiliate_id FROM customers WHERE visitor_id = 'sess_newuser_456'")
    assert customer["status"] == 3 and str(customer["affiliate_id"]) == world.affiliate_id


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"code": "NOPE", "referred_session_id": "s"}, 404, "invalid_code"),
        ({"code": "PARTNER123"}, 400, "validation_error"),
        ({"referred_session_id": "s"}, 400, "validation_error"),
    ],
)
async def test_convert_errors(edge: str, world: World, body, status, error):
    got, out, _ = await call("POST", f"{edge}/api/v1/referrals/convert", json=body)
    assert (got, out["error"]) == (status, error) and out["message"]


async def test_stats(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys, drain):
    for session in ("a", "b", "c"):
        body = {"code": "PARTNER123", "referred_session_id": session}
        await call("POST", f"{edge}/api/v1/referrals/convert", json=body)
    await drain()
    await pg.execute("UPDATE links SET leads = 5 WHERE code = 'PARTNER123'")  # five sign-ups, three converted
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/user_123", headers=api_key(world.api_key))
    assert (status, out) == (
        200,
        {
            "participant_id": "user_123",
            "total_referrals": 5,
            "conversions": 3,
            "pending": 2,
            "referral_code": "PARTNER123",
            "milestones": [],
        },
    )
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/nobody", headers=api_key(world.api_key))
    assert (status, out["error"]) == (404, "participant_not_found")
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    status, _, _ = await call("GET", f"{edge}/api/v1/referrals/stats/user_123", headers=api_key(other.api_key))
    assert status == 200  # the other workspace has its own user_123 ...
    theirs = (await call("GET", f"{edge}/api/v1/referrals/stats/user_123", headers=api_key(other.api_key)))[1]
    assert theirs["referral_code"] == "THEIRS" and theirs["conversions"] == 0  # ... and sees only its own
    status, out, _ = await call("GET", f"{edge}/api/v1/referrals/stats/user_123")
    assert (status, out["error"]) == (401, "unauthorized")
