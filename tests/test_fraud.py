"""Fraud rules on leads: self-referral by email domain, the affiliate's own address, a
disposable email; a rule the workspace excludes keeps its event out of every counter and
in the drops; reconcile recounts drops and flags; the settings routes refuse bad input."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
from structlog.testing import capture_logs

from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.manage import admin
from workers.consumer.fraud import is_disposable
from workers.consumer.store import write_batch
from workers.ops.reconcile import Drift, reconcile

from ._world import BROWSER, World, call
from .test_bursts import judge


async def lead(edge: str, key: str, email: str, *, click_from: str = "127.0.0.1") -> None:
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(click_from, 0)), headers={"User-Agent": BROWSER}
        ) as http,
        http.get(f"{edge}/r/PARTNER123", allow_redirects=False) as r,
    ):
        assert r.status == 302
        click_id = parse_qs(urlsplit(r.headers["Location"]).query)["refstream_click_id"][0]
    body = {"clickId": click_id, "eventName": "signup", "customerExternalId": email, "customerEmail": email}
    status, out, _ = await call("POST", f"{edge}/api/track/lead", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert status == 200, out


async def test_lead_rules_and_an_excluding_policy(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    h = {"Authorization": f"Bearer {world.api_key}"}
    status, ws, _ = await call(
        "PATCH", f"{edge}/v1/workspace", headers=h, json={"fraud_policy": {"self_referral": "exclude"}}
    )
    assert (status, ws["fraud_policy"]) == (200, {"self_referral": "exclude"})
    async with pg.acquire() as conn:
        mine = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], affiliate_id=world.affiliate_id
        )
    # the affiliate looks at its links from 127.0.0.7: that address is now the affiliate's
    affiliate = {"Authorization": f"Bearer {mine['api_key']}"}
    status, _, _ = await call("GET", f"{edge}/v1/affiliate/links", headers=affiliate, source_ip="127.0.0.7")
    assert status == 200

    await lead(edge, world.api_key, "someone@example.com", click_from="127.0.0.7")  # the affiliate's domain and IP
    await lead(edge, world.api_key, "x@mailinator.com")
    await lead(edge, world.api_key, "friend@gmail.com")
    await drain()

    flags = {r["rule"]: r for r in await pg.fetch("SELECT rule, evidence, excluded FROM event_flags")}
    assert set(flags) == {"self_referral", "affiliate_ip", "disposable_email"}
    assert flags["self_referral"]["evidence"] == {
        "email": "someone@example.com",
        "affiliate_email": "alex@example.com",
        "match": "domain",
    }
    assert flags["self_referral"]["excluded"] and not flags["affiliate_ip"]["excluded"]
    assert flags["affiliate_ip"]["evidence"] == {"ip": "127.0.0.7", "from": ["click"]}
    assert flags["disposable_email"]["evidence"]["domain"] == "mailinator.com"
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'PARTNER123'") == 2  # the excluded one never counted

    status, stats, _ = await call("GET", f"{edge}/v1/links/{world.link['id']}/stats", headers=h)
    assert status == 200
    assert stats["totals"]["leads"] == 2
    assert stats["totals"]["dropped"] == {"fraud": 1}
    assert stats["totals"]["dropped_detail"] == {"fraud": {"self_referral": 1}}
    assert stats["totals"]["flagged"] == {"self_referral": 1, "affiliate_ip": 1, "disposable_email": 1}

    assert await reconcile(pg, fix=False) == []
    await pg.execute("UPDATE drop_stats SET n = n + 5 WHERE reason = 'flagged' AND detail = 'disposable_email'")
    (drift,) = await reconcile(pg, fix=True)
    assert (drift.counter, drift.stored, drift.recomputed) == ("flagged.disposable_email", 6, 1)
    assert isinstance(drift, Drift)
    assert await reconcile(pg, fix=False) == []


async def test_settings_and_ranges_refuse_bad_input(edge: str, world: World) -> None:
    h = {"Authorization": f"Bearer {world.api_key}"}
    for body in ({"fraud_policy": {"self_referral": "delete"}}, {"fraud_policy": {"astrology": "flag"}}):
        status, out, _ = await call("PATCH", f"{edge}/v1/workspace", headers=h, json=body)
        assert (status, out["error"]) == (400, "invalid_request"), body
    status, out, _ = await call(
        "PATCH", f"{edge}/v1/programs/{world.program_id}/fraud", headers=h, json={"burst_clicks": 0}
    )
    assert (status, out["error"]) == (400, "invalid_request")
    status, out, _ = await call(
        "PATCH", f"{edge}/v1/programs/{world.program_id}/fraud", headers=h, json={"fast_conversion_seconds": 30}
    )
    assert status == 200
    assert out["fraud_thresholds"] == {"burst_clicks": 20, "burst_seconds": 60, "fast_conversion_seconds": 30}
    status, out, _ = await call("PATCH", f"{edge}/v1/programs/not-a-uuid/fraud", headers=h, json={})
    assert status == 404
    stats = f"{edge}/v1/links/{world.link['id']}/stats"
    for query in ("?from=yesterday", "?from=2026-02-01&to=2026-01-01", "?from=2020-01-01&to=2026-01-01"):
        status, out, _ = await call("GET", stats + query, headers=h)
        assert (status, out["error"]) == (400, "invalid_request"), query
    status, out, _ = await call("GET", stats + "?from=2026-01-01&to=2026-01-31", headers=h)
    assert (status, out["from"], out["to"], out["daily"]) == (200, "2026-01-01", "2026-01-31", [])
    status, out, _ = await call("GET", f"{edge}/v1/links/7d1f0000-0000-4000-8000-000000000000/stats", headers=h)
    assert status == 404


async def test_the_fraud_settings_take_idempotency_keys(edge: str, world: World) -> None:
    h = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "fraud-1"}
    url = f"{edge}/v1/programs/{world.program_id}/fraud"
    first = await call("PATCH", url, headers=h, json={"burst_clicks": 5, "burst_seconds": 1.0e1})
    assert first[0] == 200 and first[1]["fraud_thresholds"]["burst_clicks"] == 5
    again = await call("PATCH", url, headers=h, json={"burst_clicks": 5, "burst_seconds": 1.0e1})
    assert again[:2] == first[:2] and again[2]["Idempotent-Replayed"] == "true"
    other = await call("PATCH", url, headers=h, json={"burst_clicks": 6})
    assert (other[0], other[1]["error"]) == (422, "idempotency_key_reused")
    for body in ({"burst_clicks": "5"}, {"burst_clicks": True}, {"burst_seconds": 1.5}):
        status, out, _ = await call("PATCH", url, headers={"Authorization": h["Authorization"]}, json=body)
        assert (status, out["error"]) == (400, "invalid_request"), body
    h = {**h, "Idempotency-Key": "policy-1"}
    policy = {"fraud_policy": {"click_burst": "exclude"}}
    first = await call("PATCH", f"{edge}/v1/workspace", headers=h, json=policy)
    again = await call("PATCH", f"{edge}/v1/workspace", headers=h, json=policy)
    assert first[0] == 200 and again[:2] == first[:2] and again[2]["Idempotent-Replayed"] == "true"


async def test_clicks_in_one_millisecond_count_each_other_once(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """A burst's clicks ordered by time, then event id: of four clicks from one IP in the
    same millisecond (one round trip per request makes that common) past a threshold of
    two, the third and fourth are flagged, not all four, each an id of a ``burst_flags`` row made
    after the commit (``workers.consumer.burst_pass``)."""
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, "Burst")
        link = await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code="samems")
        await conn.execute(
            "UPDATE programs SET fraud_thresholds = '{\"burst_clicks\": 2}' WHERE workspace_id = $1", ws["workspace_id"]
        )
    at = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    clicks = [
        Envelope(
            EventType.CLICK,
            Dialect.BIORE,
            {"code": "samems"},
            workspace_id=ws["workspace_id"],
            ip="198.51.100.7",
            user_agent=BROWSER,
            received_at_ms=at,
        )
        for _ in range(4)
    ]
    await write_batch(pg, clicks)
    await judge(pg)
    flagged = await pg.fetch(
        "SELECT event_id, evidence FROM click_burst_flags WHERE event_id = ANY($1::uuid[])",
        [c.event_id for c in clicks],
    )
    # the threshold crossed and the window, nothing on the clicks' rows (schemas 23, 25)
    assert [(r["evidence"]["threshold_clicks"], r["evidence"]["window_seconds"]) for r in flagged] == [(2, 60)] * 2
    assert not await pg.fetchval(
        "SELECT count(*) FROM events WHERE link_id = $1 AND burst_clicks IS NOT NULL", link["id"]
    )
    # the two flagged are the two last in (time, event id) order
    assert {r["event_id"] for r in flagged} == {c.event_id for c in sorted(clicks, key=lambda c: c.event_id)[2:]}


async def test_thresholds_written_by_hand_fall_back_to_the_defaults(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """The API refuses a bad threshold; one written into the table by hand must not fail
    the program's batches: each unusable value counts as its default (20 clicks), and a
    warning names it."""
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, "Hand")
        await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code="byhand")
        await conn.execute(
            """UPDATE programs SET fraud_thresholds = '{"burst_clicks": null, "burst_seconds": "soon"}'"""
            " WHERE workspace_id = $1",
            ws["workspace_id"],
        )
    clicks = [
        Envelope(
            EventType.CLICK,
            Dialect.BIORE,
            {"code": "byhand"},
            workspace_id=ws["workspace_id"],
            ip="198.51.100.8",
            user_agent=BROWSER,
        )
        for _ in range(21)
    ]
    with capture_logs() as logs:
        await write_batch(pg, clicks)
        await judge(pg)
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'byhand'") == 21
    flagged = await pg.fetch(
        "SELECT f.evidence FROM click_burst_flags f JOIN events e USING (event_id) JOIN links l ON l.id = e.link_id"
        " WHERE l.code = 'byhand'"
    )
    # the default threshold of 20, crossed by the 21st
    assert [(r["evidence"]["threshold_clicks"], r["evidence"]["window_seconds"]) for r in flagged] == [(20, 60)]
    bad = {(e["threshold"], e["value"]) for e in logs if e["event"] == "fraud.bad_threshold"}
    assert bad == {("burst_clicks", "None"), ("burst_seconds", "'soon'")}


def test_disposable_domains_ship_with_the_package() -> None:
    assert is_disposable("mailinator.com") and is_disposable("eu.mailinator.com")
    assert not is_disposable("gmail.com") and not is_disposable("example.com")
