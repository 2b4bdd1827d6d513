"""Why events did not count, end to end with real processes: a mix of humans, bots,
unknown codes, an inactive link, a rate-limited burst, an out-of-window lead, test events,
a client's repeated lead and a redelivered entry; every reason's count is what was sent,
the counted totals are the link's counters, and an affiliate key sees only its own links.
Fraud: a self-referral, a click burst and a fast conversion are flagged with their
evidence, the fast conversion excluded by policy, and ``fraud.flagged`` is delivered."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from ingest.contract import clicks, wire
from ingest.contract.events import EventType, uuid7
from ingest.contract.keys import Keys
from refstream.embedded import free_port
from workers.consumer.webhooks import verify_signature

from ._procs import Procs, env_for, run_command
from ._world import BROWSER

RATE = 5  # the click route's limit per IP and minute, for this test
BURST = 3  # the program's click_burst threshold: a 4th click from one IP within a minute is flagged


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with http.request(method, url, allow_redirects=False, **kw) as r:
        body = await r.read()
        try:
            return r.status, orjson.loads(body) if body else None, r.headers
        except orjson.JSONDecodeError:
            return r.status, body, r.headers


async def until(check: Any, what: str, within_s: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {within_s} s: {what}")
        await asyncio.sleep(0.1)


async def test_every_reason_counted_and_fraud_flagged(procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys):
    hooks: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await _scenario(procs, pg, redis, keys, hooks, f"http://127.0.0.1:{port}/hook")
    finally:
        await runner.cleanup()


async def _scenario(procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys, hooks: list[Any], hook_url: str) -> None:
    ws = await procs.cli("workspace", "create", "Acme")
    wid, key = ws["workspace_id"], ws["api_key"]
    base = await procs.start_edge(  # the webhook's receiver is on loopback
        REFSTREAM_CLICK_RATE_LIMIT_PER_MIN=str(RATE),
        REFSTREAM_TRUSTED_PROXIES="127.0.0.1/32",
        REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true",
    )
    procs.start("work", REFSTREAM_DROPS_FOLD_EVERY_S="1", REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true")
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        h = auth(key)
        _, program, _ = await call(http, "POST", f"{base}/v1/programs", headers=h, json={"name": "Spring"})
        status, _, _ = await call(
            http, "PATCH", f"{base}/v1/programs/{program['id']}/fraud", headers=h, json={"burst_clicks": BURST}
        )
        assert status == 200
        aff = {}
        for name in ("alice", "bob"):
            _, aff[name], _ = await call(
                http,
                "POST",
                f"{base}/v1/affiliates",
                headers=h,
                json={"program_id": program["id"], "external_id": name, "email": f"{name}@{name}-media.test"},
            )
        link = {}
        for code, owner in (("alice", "alice"), ("bob", "bob"), ("carol", "bob")):
            status, link[code], _ = await call(
                http,
                "POST",
                f"{base}/v1/links",
                headers=h,
                json={"affiliate_id": aff[owner]["id"], "code": code, "url": "https://acme.test/"},
            )
            assert status == 201, link[code]
        await call(http, "PATCH", f"{base}/v1/links/{link['carol']['id']}", headers=h, json={"status": "inactive"})
        status, ws_now, _ = await call(
            http, "PATCH", f"{base}/v1/workspace", headers=h, json={"fraud_policy": {"fast_conversion": "exclude"}}
        )
        assert ws_now["fraud_policy"] == {"fast_conversion": "exclude"}
        status, webhook, _ = await call(
            http, "POST", f"{base}/v1/webhooks", headers=h, json={"url": hook_url, "events": ["fraud.flagged"]}
        )
        assert status == 201, webhook
        _, made, _ = await call(
            http, "POST", f"{base}/v1/keys", headers=h, json={"affiliate_id": aff["alice"]["id"], "scopes": ["read"]}
        )
        alice_key = made["api_key"]

        def click(code: str, ip: str, ua: str = BROWSER) -> Any:
            return call(
                http, "POST", f"{base}/api/v1/referral/click/{code}", headers={"X-Forwarded-For": ip, "User-Agent": ua}
            )

        async def redirect(code: str, ip: str) -> str:
            status, _, headers = await call(http, "GET", f"{base}/r/{code}", headers={"X-Forwarded-For": ip})
            assert status == 302
            click_id: str = parse_qs(urlsplit(headers["Location"]).query)["refstream_click_id"][0]
            return click_id

        # humans, bots, unknown codes, an inactive link, one IP over the limit (and bursting)
        sent = [click("alice", f"10.1.0.{i}") for i in range(12)]
        sent += [click("alice", f"10.2.0.{i}", "curl/8.4.0") for i in range(4)]
        sent += [click(f"ghost-{i}", f"10.3.0.{i}") for i in range(3)]
        sent += [click("carol", f"10.4.0.{i}") for i in range(2)]
        replies = await asyncio.gather(*sent)
        assert all(s == 200 for s, _, _ in replies), replies
        burst = [await click("alice", "10.9.9.9") for _ in range(RATE + 3)]
        assert [s for s, _, _ in burst] == [200] * RATE + [429] * 3

        # test events (Affitor's test mode) on alice's link
        for i in range(2):
            status, _, _ = await call(
                http,
                "POST",
                f"{base}/api/v1/track/click",
                json={"affiliate_url": "https://acme.test/?aff=alice", "additional_data": {"test_mode": True}},
                headers={"X-Forwarded-For": f"10.5.0.{i}"},
            )
            assert status == 200

        # leads: a self-referral, a client's repeat (same customer and event name), and a
        # lead whose click is older than the cookie window (30 days)
        visitor = await redirect("alice", "10.6.0.1")
        lead = {
            "clickId": visitor,
            "eventName": "signup",
            "customerExternalId": "cust-1",
            "customerEmail": "alice@alice-media.test",
        }
        for _ in range(2):
            status, body, _ = await call(http, "POST", f"{base}/api/track/lead", headers=h, json=lead)
            assert status == 200, body
        old = uuid7(ms=int(time.time() * 1000) - 40 * 86_400_000)
        await pg.execute(
            "INSERT INTO events (event_id, type, workspace_id, link_id, click_id, dialect, received_at)"
            " VALUES ($1, 1, $2, $3, $1, 'redirect', now() - interval '40 days')",
            old,
            wid,
            link["bob"]["id"],
        )
        await procs.cli("reconcile", "--fix", check=False)  # bob's counters: as if that click had been counted
        status, body, _ = await call(
            http,
            "POST",
            f"{base}/api/track/lead",
            headers=h,
            json={"clickId": clicks.mint(old), "eventName": "signup", "customerExternalId": "cust-old"},
        )
        assert status == 200, body
        status, body, _ = await call(http, "POST", f"{base}/api/track/lead", headers=h, json={"eventName": "x"})
        assert status == 400, body  # invalid: the workspace is known, no link

        # a conversion right after its click: flagged fast_conversion, excluded by the policy
        fast = await redirect("alice", "10.6.0.2")
        status, body, _ = await call(
            http, "POST", f"{base}/api/v1/referrals/convert", json={"code": "alice", "referred_session_id": fast}
        )
        assert status == 200, body

        # the affiliate's key, from its own address: its stats, its links only
        status, mine, _ = await call(
            http, "GET", f"{base}/v1/affiliate/stats", headers={**auth(alice_key), "X-Forwarded-For": "10.8.0.1"}
        )
        assert status == 200 and mine["links"] == 1, mine
        status, _, _ = await call(http, "GET", f"{base}/v1/links/{link['bob']['id']}/stats", headers=auth(alice_key))
        assert status == 403

        await procs.cli("work", "--drain")
        # redeliveries (copies of stored entries, the self-referral's lead and its client's
        # repeat among them): not duplicates, nothing moves
        stream = keys.stream_for("alice")
        leads = [f for _, f in await redis.xrange(stream) if wire.from_entry(f).type is EventType.LEAD]
        assert len(leads) == 2
        for fields in leads:
            await redis.xadd(stream, fields)
        await procs.cli("work", "--drain")

        expected = {"bot": 4, "rate_limited": 3, "test_mode": 2, "duplicate": 1, "fraud": 1}

        async def alice_stats() -> Any:
            _, s, _ = await call(http, "GET", f"{base}/v1/links/{link['alice']['id']}/stats", headers=h)
            return s if s["totals"]["dropped"] == expected else None

        stats = await until(alice_stats, f"alice's drops: {expected}")
        totals = stats["totals"]
        assert totals["dropped_detail"] == {"bot": {"ua_list": 4}, "fraud": {"fast_conversion": 1}}
        assert totals["flagged"] == {"click_burst": RATE - BURST, "self_referral": 1, "fast_conversion": 1}
        shown = await procs.cli("link", "show", "alice")
        assert (totals["clicks"], totals["leads"], totals["conversions"]) == (
            shown["clicks"],
            shown["leads"],
            shown["conversions"],
        )
        assert (shown["clicks"], shown["leads"], shown["conversions"]) == (12 + RATE + 2, 1, 0)
        assert shown["stats"]["totals"]["dropped"] == expected
        exit_code, table, err = await run_command("link", "show", "alice", env=env_for(procs.settings, COLUMNS="250"))
        assert exit_code == 0, err
        assert "bot 4, duplicate 1, fraud 1, rate_limited 3, test_mode 2" in table, table
        assert f"click_burst {RATE - BURST}, fast_conversion 1, self_referral 1" in table, table
        _, bob, _ = await call(http, "GET", f"{base}/v1/links/{link['bob']['id']}/stats", headers=h)
        assert bob["totals"]["dropped"] == {"out_of_window": 1}

        async def edge_drops() -> Any:
            rows = await pg.fetch(
                "SELECT link_id, reason, sum(n)::int AS n FROM drop_stats WHERE source = 'edge' GROUP BY 1, 2"
            )
            got = {(str(r["link_id"]), r["reason"]): r["n"] for r in rows}
            return got if len(got) == 4 else None

        no_link = "00000000-0000-0000-0000-000000000000"
        assert await until(edge_drops, "the edge's refusals folded") == {
            (no_link, "unknown_code"): 3,
            (link["carol"]["id"], "inactive_link"): 2,
            (link["alice"]["id"], "rate_limited"): 3,
            (no_link, "invalid"): 1,
        }

        # the affiliate sees its own link's numbers, and nobody else's
        _, mine, _ = await call(http, "GET", f"{base}/v1/affiliate/stats", headers=auth(alice_key))
        assert mine["totals"] == totals
        flags = {r["rule"]: r for r in await pg.fetch("SELECT rule, evidence, excluded FROM event_flags")}
        assert flags["self_referral"]["evidence"]["match"] == "email"
        assert flags["fast_conversion"]["excluded"] is True
        assert flags["fast_conversion"]["evidence"]["seconds_after_click"] < 10
        # a burst's flags are ids of burst_flags rows, judged after the batch's commit (schemas
        # 23, 25): the threshold crossed and the window, the address the click's row's; none on
        # the rows, none in event_flags
        bursts = await pg.fetch(
            "SELECT f.evidence, f.excluded, host(e.ip) AS ip FROM click_burst_flags f JOIN events e USING (event_id)"
        )
        assert not await pg.fetchval("SELECT count(*) FROM event_flags WHERE rule = 'click_burst'")
        assert {r["ip"] for r in bursts} == {"10.9.9.9"} and len(bursts) == RATE - BURST
        assert {
            (r["evidence"]["threshold_clicks"], r["evidence"]["window_seconds"], r["excluded"]) for r in bursts
        } == {(BURST, 60, False)}
        assert not await pg.fetchval("SELECT count(*) FROM events WHERE burst_clicks IS NOT NULL")
        assert await pg.fetchval("SELECT count(*) FROM affiliate_ips WHERE host(ip) = '10.8.0.1'") == 1

        drift = await procs.cli("reconcile")
        assert drift["drift"] == [], drift

        async def delivered() -> Any:
            return len(hooks) >= RATE - BURST + 2 and hooks  # the burst's clicks, the lead, the conversion

        # the burst's pass may be a `work --drain`'s, above: it queues its deliveries' jobs
        # for the running worker, as the worker's own pass does (workers.host.worker.drain)
        got = await until(delivered, "fraud.flagged delivered", within_s=75.0)
        for headers, body in got:
            assert headers["X-Refstream-Event"] == "fraud.flagged"
            assert verify_signature(webhook["secret"], headers["X-Refstream-Signature"], body)
        notified = [f for _, body in got for f in orjson.loads(body)["data"]["flags"]]
        # the notice tells the address with the rest of the evidence
        assert {f["evidence"]["ip"] for f in notified if f["rule"] == "click_burst"} == {"10.9.9.9"}
        rules = sorted(f["rule"] for f in notified)
        assert rules == sorted(["fast_conversion", "self_referral"] + ["click_burst"] * (RATE - BURST))
