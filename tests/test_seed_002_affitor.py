"""Seed 002 (Affitor) ``POST /api/v1/track/click``: the example, every error row, test mode,
existing_click_id, and what a drain leaves in Postgres."""

from __future__ import annotations

import asyncpg
import pytest

from ingest.contract.keys import Keys

from ._world import World, call

EXAMPLE = {
    "affiliate_url": "https://yoursite.com/pricing?aff=PARTNER123",
    "page_url": "https://yoursite.com/pricing",
    "page_title": "Pricing — YourSite",
    "referrer_url": "https://blog.example.com/post",
    "session_id": "sess_abc123",
    "screen_resolution": "1920x1080",
    "viewport_size": "1280x800",
    "language": "en-US",
    "timezone": "America/New_York",
}
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"


async def stream_total(redis, keys: Keys) -> int:
    return sum([await redis.xlen(s) for s in keys.streams])


async def test_example_request(edge: str, world: World, pg: asyncpg.Pool, drain):
    status, body, headers = await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE, headers={"User-Agent": UA})
    assert status == 200
    assert set(body) == {"success", "click_id", "partner_code", "cookie_window_days"}
    assert body["success"] is True
    assert body["click_id"].startswith("clk_") and len(body["click_id"]) == 36
    assert body["partner_code"] == "PARTNER123"
    assert body["cookie_window_days"] == 60
    assert "X-RateLimit-Remaining" in headers

    await drain()
    link = await pg.fetchrow("SELECT clicks, leads, last_clicked_at FROM links WHERE code = 'PARTNER123'")
    assert link["clicks"] == 1 and link["leads"] == 0 and link["last_clicked_at"] is not None
    event = await pg.fetchrow("SELECT *, event_user_agent(user_agent, agent_id) AS ua FROM events")
    assert event["dialect"] == "affitor" and event["type"] == 1 and not event["test_mode"]
    assert event["ua"] == UA  # falls back to the header
    assert event["referrer"] == EXAMPLE["referrer_url"]
    assert event["payload"]["page_title"] == EXAMPLE["page_title"]
    assert event["payload"]["session_id"] == "sess_abc123"
    assert "clk_" + event["click_id"].hex == body["click_id"]
    customer = await pg.fetchrow("SELECT * FROM customers")
    assert customer["status"] == 1 and customer["visitor_id"] == body["click_id"]
    assert str(customer["link_id"]) == world.link["id"] and str(customer["affiliate_id"]) == world.affiliate_id
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats WHERE affiliate_id = $1", world.affiliate_id) == 1


async def test_body_user_agent_wins_over_the_header(edge: str, world: World, pg: asyncpg.Pool, drain):
    await call(
        "POST", f"{edge}/api/v1/track/click", json={**EXAMPLE, "user_agent": "Tracker/1.0"}, headers={"User-Agent": UA}
    )
    await drain()
    assert await pg.fetchval("SELECT event_user_agent(user_agent, agent_id) FROM events") == "Tracker/1.0"


async def test_existing_click_id_reuses_the_customer(edge: str, world: World, pg: asyncpg.Pool, drain):
    _, first, _ = await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE)
    _, second, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={**EXAMPLE, "existing_click_id": first["click_id"]}
    )
    assert second["click_id"] == first["click_id"]
    _, third, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={**EXAMPLE, "existing_click_id": "clk_" + "0" * 32}
    )
    assert third["click_id"] != first["click_id"]  # unknown to refstream: a new click id
    await drain()
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 3
    assert await pg.fetchval("SELECT count(*) FROM customers") == 2
    assert await pg.fetchval("SELECT visitor_id FROM customers ORDER BY first_seen_at LIMIT 1") == first["click_id"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"page_url": "https://yoursite.com"}, "affiliate_url is required"),
        ({"affiliate_url": "not a url"}, "affiliate_url is not a valid URL"),
        ({"affiliate_url": "ftp://yoursite.com/?aff=PARTNER123"}, "affiliate_url is not a valid URL"),
        ({"affiliate_url": "https://yoursite.com/pricing?ref=PARTNER123"}, "No aff parameter found in affiliate_url"),
        ({"affiliate_url": "https://yoursite.com/?aff=NOPE"}, "No referral link found for aff=NOPE"),
    ],
)
async def test_400_rows(edge: str, world: World, redis, keys: Keys, body, message):
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=body)
    assert (status, out) == (400, {"success": False, "error": message})
    assert await stream_total(redis, keys) == 0


async def test_misconfigured_link_is_a_400(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    from ingest.contract import links

    await pg.execute("DELETE FROM affiliates WHERE id = $1", world.affiliate_id)  # the link loses its partner
    await pg.execute("UPDATE links SET updated_at = now()")
    link = await links.fetch(pg, "PARTNER123")
    assert link is not None and not link.configured
    await links.put(redis, keys, link)
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE)
    assert (status, out) == (
        400,
        {"success": False, "error": "Referral link configuration is invalid (missing partner or program)"},
    )
    assert await stream_total(redis, keys) == 0


async def test_inactive_link_is_200_success_false(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    from ingest.contract import links

    await pg.execute("UPDATE links SET status = 'inactive', updated_at = now() WHERE code = 'PARTNER123'")
    info = await links.fetch(pg, "PARTNER123")
    assert info is not None
    await links.put(redis, keys, info)
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE)
    assert (status, out) == (200, {"success": False, "error": "Referral link is inactive"})
    assert await stream_total(redis, keys) == 0


async def test_test_mode_is_stored_and_never_counted(edge: str, world: World, pg: asyncpg.Pool, drain):
    body = {**EXAMPLE, "additional_data": {"test_mode": True, "program_id": 1}}
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=body)
    assert status == 200
    assert out["success"] is True and out["message"] == "Test click event tracked successfully"
    assert out["data"]["programId"] == 1 and out["data"]["test_mode"] is True
    await drain()
    event = await pg.fetchrow("SELECT event_id, test_mode FROM events")
    assert event["test_mode"] is True and str(event["event_id"]) == out["data"]["eventId"]
    link = await pg.fetchrow("SELECT clicks, last_clicked_at FROM links WHERE code = 'PARTNER123'")
    assert (link["clicks"], link["last_clicked_at"]) == (0, None)
    assert await pg.fetchval("SELECT count(*) FROM customers") == 0
    assert await pg.fetchval("SELECT count(*) FROM daily_stats") == 0


@pytest.mark.parametrize(
    ("data", "status", "message_part"),
    [
        (b"{not json", 400, "Invalid JSON body"),
        (b"[1, 2]", 400, "Invalid JSON body"),
        (b'{"affiliate_url": "https://yoursite.com/?aff=PARTNER123", "page_title": 123}', 400, "page_title"),
        (
            b'{"affiliate_url": "https://yoursite.com/?aff=PARTNER123", "page_title": "' + b"x" * 600 + b'"}',
            400,
            "page_title",
        ),
        (b'{"affiliate_url": "' + b"x" * 70_000 + b'"}', 413, "larger than"),
    ],
)
async def test_bad_bodies_get_the_dialects_4xx(edge: str, world: World, data, status, message_part):
    got, out, _ = await call("POST", f"{edge}/api/v1/track/click", data=data)
    assert got == status
    assert out["success"] is False and message_part in out["error"]


async def test_public_routes_are_limited_per_client_ip(settings, world: World):
    from ._world import start_edge

    runner, edge = await start_edge(settings.model_copy(update={"public_rate_limit_per_min": 3}))
    try:
        for _ in range(3):
            assert (await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE))[0] == 200
        status, out, headers = await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE)
        assert (status, out) == (429, {"success": False, "error": "Too many requests"})
        assert int(headers["Retry-After"]) >= 1 and headers["X-RateLimit-Limit"] == "3"
        # the same family: Bricqs' public routes share the per-IP budget
        status, out, _ = await call("GET", f"{edge}/api/v1/referrals/validate/PARTNER123")
        assert (status, out["error"]) == (429, "rate_limited")
        # another client address is unaffected
        assert (await call("POST", f"{edge}/api/v1/track/click", json=EXAMPLE, source_ip="127.0.0.2"))[0] == 200
    finally:
        await runner.cleanup()
