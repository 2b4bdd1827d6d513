"""What the worker makes of events: enrichment, bots, unique clicks, IP policy, customers
that do not depend on processing order, milestones reached once, webhooks."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.consumer.store import write_batch
from workers.consumer.webhooks import verify_signature

from ._procs import Procs, free_port
from ._world import BROWSER, ENRICHMENT, World, call, make_world, start_edge
from .conftest import wait_for

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


async def proxied_click(edge: str, client_ip: str, ua: str, **body: object) -> dict[str, Any]:
    headers = CIMultiDict({"X-Forwarded-For": client_ip, "User-Agent": ua})
    payload = {
        "affiliate_url": "https://yoursite.com/?aff=PARTNER123",
        "referrer_url": "https://www.news.example/a",
        **body,
    }
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=payload, headers=headers)
    assert status == 200, out
    answer: dict[str, Any] = out
    return answer


async def test_enrichment_bots_and_unique_clicks(settings: Settings, world: World, pg: asyncpg.Pool, drain):
    runner, edge = await start_edge(settings.model_copy(update={"trusted_proxies": [ip_network("127.0.0.1/32")]}))
    try:
        first = await proxied_click(edge, "81.2.69.160", CHROME)
        await proxied_click(edge, "81.2.69.160", CHROME, existing_click_id=first["click_id"])  # same visitor
        await proxied_click(edge, "77.88.8.8", CHROME)  # another visitor
        await proxied_click(edge, "66.249.66.1", GOOGLEBOT)  # a crawler
        await proxied_click(edge, "8.8.8.8", CHROME)  # a browser UA, from a datacenter
    finally:
        await runner.cleanup()
    await drain()
    link = await pg.fetchrow("SELECT clicks, unique_clicks, bot_clicks FROM links WHERE code = 'PARTNER123'")
    assert (link["clicks"], link["unique_clicks"], link["bot_clicks"]) == (3, 2, 2)
    day = await pg.fetchrow("SELECT clicks, unique_clicks, bot_clicks FROM daily_stats")
    assert (day["clicks"], day["unique_clicks"], day["bot_clicks"]) == (3, 2, 2)
    assert await pg.fetchval("SELECT count(*) FROM customers") == 2  # bots make no customer

    row = await pg.fetchrow(f"SELECT *, {ENRICHMENT} AS whole FROM events WHERE host(ip) = '81.2.69.160' LIMIT 1")
    assert (row["country"], row["is_bot"]) == ("GB", False)
    enrichment = row["whole"]
    assert (enrichment["browser"], enrichment["os"], enrichment["device_type"]) == ("Chrome", "Windows", "desktop")
    assert enrichment["referrer_domain"] == "news.example" and enrichment["versions"]
    bot = await pg.fetchrow(
        f"SELECT is_bot, {ENRICHMENT} AS enrichment FROM events WHERE event_user_agent(user_agent, agent_id) = $1",
        GOOGLEBOT,
    )
    assert bot["is_bot"] and bot["enrichment"]["bot_reason"] == "ua_spider"
    dc = await pg.fetchrow(f"SELECT is_bot, {ENRICHMENT} AS enrichment FROM events WHERE host(ip) = '8.8.8.8'")
    assert dc["is_bot"] and dc["enrichment"]["bot_reason"] == "datacenter_asn"


async def test_ip_policy_per_workspace(settings: Settings, world: World, pg: asyncpg.Pool, drain):
    runner, edge = await start_edge(settings.model_copy(update={"trusted_proxies": [ip_network("127.0.0.1/32")]}))
    try:
        await pg.execute("UPDATE workspaces SET ip_policy = 'truncated'")
        await proxied_click(edge, "81.2.69.160", CHROME)
        await drain()
        await pg.execute("UPDATE workspaces SET ip_policy = 'none'")
        await proxied_click(edge, "81.2.69.161", CHROME)
        await drain()
    finally:
        await runner.cleanup()
    ips = [r["ip"] for r in await pg.fetch("SELECT host(ip) AS ip FROM events ORDER BY event_id")]
    assert ips == ["81.2.69.0", None]
    assert await pg.fetchval("SELECT count(*) FROM events WHERE country = 'GB'") == 2  # geo from the full address


def _journey(code: str, workspace: str, visitor: str) -> list[Envelope]:
    """A click, a lead and a conversion of one visitor, a minute apart."""
    t = 1_790_000_000_000
    click = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.AFFITOR,
        workspace_id=workspace,
        received_at_ms=t,
        ip="81.2.69.160",
        user_agent=CHROME,
        payload={"code": code, "visitor_id": visitor},
    )
    lead = Envelope(
        type=EventType.LEAD,
        dialect=Dialect.REFPORT,
        workspace_id=workspace,
        received_at_ms=t + 60_000,
        payload={
            "code": code,
            "visitor_id": visitor,
            "name": "Sign Up",
            "external_id": "u1",
            "email": "old@example.com",
            "customer_name": "Alice",
        },
    )
    lead2 = Envelope(
        type=EventType.LEAD,
        dialect=Dialect.REFPORT,
        workspace_id=workspace,
        received_at_ms=t + 90_000,
        payload={
            "code": code,
            "visitor_id": visitor,
            "name": "Activated",
            "external_id": "u1",
            "email": "new@example.com",
        },
    )
    conv = Envelope(
        type=EventType.CONVERSION,
        dialect=Dialect.BRICQS,
        workspace_id=workspace,
        received_at_ms=t + 120_000,
        payload={"code": code, "visitor_id": visitor, "dedupe": "s1"},
    )
    return [click, lead, lead2, conv]


async def test_customers_do_not_depend_on_processing_order(pg: asyncpg.Pool, redis, keys: Keys):
    a = await make_world(pg, redis, keys, code="INORDER", name="A")
    b = await make_world(pg, redis, keys, code="REVERSED", name="B")
    for batch in _journey("INORDER", a.workspace_id, "vis"):
        await write_batch(pg, [batch])
    for batch in reversed(_journey("REVERSED", b.workspace_id, "vis")):  # conversion first, click last
        await write_batch(pg, [batch])
    cols = "status, external_id, email, name, first_seen_at, last_seen_at, first_click_id IS NOT NULL AS has_click"
    rows = [await pg.fetchrow(f"SELECT {cols} FROM customers WHERE workspace_id = $1", w.workspace_id) for w in (a, b)]
    assert rows[0] == rows[1]
    assert (rows[0]["status"], rows[0]["email"], rows[0]["name"], rows[0]["has_click"]) == (
        3,
        "new@example.com",
        "Alice",
        True,
    )
    for code in ("INORDER", "REVERSED"):
        link = await pg.fetchrow("SELECT clicks, leads, conversions FROM links WHERE code = $1", code)
        assert tuple(link) == (1, 2, 1)


async def test_milestones_are_reached_once_and_notified(edge: str, world: World, pg: asyncpg.Pool, drain):
    h = {"Authorization": f"Bearer {world.api_key}"}
    spring = {"name": "Spring", "milestones": [{"name": "First", "threshold": 1}, {"name": "Refer 3", "threshold": 3}]}
    status, program, _ = await call("POST", f"{edge}/v1/programs", headers=h, json=spring)
    assert status == 201 and [m["threshold"] for m in program["milestones"]] == [1, 3]
    generated = await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        headers={"X-API-Key": world.api_key},
        json={"participant_id": "ally", "campaign_id": program["id"]},
    )
    code = generated[1]["code"]
    status, hook, _ = await call("POST", f"{edge}/v1/webhooks", headers=h, json={"url": "https://hooks.test/in"})
    assert status == 201

    async def convert(session: str) -> None:
        body = {"code": code, "referred_session_id": session}
        assert (await call("POST", f"{edge}/api/v1/referrals/convert", json=body))[0] == 200

    await convert("s1")
    await drain()
    await convert("s2")
    await convert("s3")
    await convert("s3")  # a repeat: no conversion, no milestone
    await drain()
    stats = (await call("GET", f"{edge}/api/v1/referrals/stats/ally", headers={"X-API-Key": world.api_key}))[1]
    assert stats["conversions"] == 3
    assert [(m["name"], m["threshold"]) for m in stats["milestones"]] == [("First", 1), ("Refer 3", 3)]
    assert await pg.fetchval("SELECT count(*) FROM affiliate_milestones") == 2
    kinds = [r["event_type"] for r in await pg.fetch("SELECT event_type FROM webhook_deliveries ORDER BY created_at")]
    assert kinds.count("conversion.created") == 3 and kinds.count("milestone.reached") == 2
    assert hook["id"]


async def test_a_lead_reaches_a_webhook_receiver_through_the_worker(procs: Procs, world: World, pg, settings: Settings):
    received: list[tuple[dict[str, Any], str, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((orjson.loads(body), request.headers["X-Refstream-Signature"], body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        # the receiver is on loopback: allowed as an on-premises operator allows it
        edge = await procs.start_edge(REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true")
        procs.start("work", REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true")
        h = {"Authorization": f"Bearer {world.api_key}"}
        target = {"url": f"http://127.0.0.1:{port}/hook", "events": ["lead.created"]}
        status, hook, _ = await call("POST", f"{edge}/v1/webhooks", headers=h, json=target)
        assert status == 201
        click = (
            await call(
                "POST",
                f"{edge}/api/v1/track/click",
                json={"affiliate_url": "https://x/?aff=PARTNER123"},
                headers={"User-Agent": BROWSER},
            )
        )[1]
        lead = {"clickId": click["click_id"], "eventName": "Sign Up", "customerExternalId": "u7"}
        assert (await call("POST", f"{edge}/api/track/lead", json=lead, headers=h))[0] == 200

        async def delivered() -> bool:
            # received, and the worker's record of it (written once the receiver answered)
            row = await pg.fetchrow("SELECT status FROM webhook_deliveries")
            return bool(received) and row is not None and row["status"] == "delivered"

        await wait_for(delivered, timeout=60, what="the webhook delivery")
    finally:
        await runner.cleanup()
    payload, signature, body = received[0]
    assert payload["type"] == "lead.created"
    assert payload["data"]["customer"]["external_id"] == "u7" and payload["data"]["click_id"] == click["click_id"]
    assert verify_signature(hook["secret"], signature, body)
    assert not verify_signature(hook["secret"] + "x", signature, body)
    row = await pg.fetchrow("SELECT status, attempts FROM webhook_deliveries")
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    assert hook["secret"] not in procs.logs()
