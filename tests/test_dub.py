"""Dub's tracking API at Dub's paths (``ingest.edge.routes.dub``): client-side clicks and
their hostnames, the lead's modes, quantities and old field names, direct sale tracking,
and Dub's error shape; each stored once in Postgres."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from ingest.contract import links
from ingest.contract.keys import Keys
from ingest.edge.routes.dub import allowed_host
from workers.ops.reconcile import reconcile

from ._world import BROWSER, World, call
from .test_erasure import erase_key

CLICK = {"domain": "yoursite.com", "key": "PARTNER123"}
UNKNOWN_CLICK = "clk_" + "0" * 32


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def click(edge: str, agent: str = BROWSER, **headers: str) -> tuple[int, Any]:
    status, out, _ = await call("POST", f"{edge}/track/click", json=CLICK, headers={"User-Agent": agent, **headers})
    return status, out


async def lead(edge: str, key: str, **body: Any) -> tuple[int, Any]:
    status, out, _ = await call(
        "POST", f"{edge}/track/lead", json={"eventName": "Sign up", **body}, headers=bearer(key)
    )
    return status, out


def dub_error(out: Any, code: str) -> None:
    assert set(out) == {"error"} and out["error"]["code"] == code, out
    assert out["error"]["message"] and out["error"]["doc_url"].endswith("#" + code.replace("_", "-"))


async def test_a_click_answers_its_id_and_a_reload_counts_once(edge: str, world: World, pg: asyncpg.Pool, drain):
    status, first = await click(edge)
    assert status == 200 and first == {"clickId": first["clickId"], "partner": None, "discount": None}
    assert first["clickId"].startswith("clk_")
    assert await click(edge) == (200, first)  # the same browser within the hour: its first id
    status, other = await click(edge, agent=BROWSER + " other")
    assert status == 200 and other["clickId"] != first["clickId"]
    await drain()
    rows = await pg.fetch("SELECT dialect, 'clk_' || replace(event_id::text, '-', '') AS id FROM events WHERE type = 1")
    assert sorted(r["id"] for r in rows) == sorted([first["clickId"], other["clickId"]])
    assert {r["dialect"] for r in rows} == {"dub"}
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 2


async def test_a_double_click_stores_one_click_and_answers_both_its_id(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """Requests of one browser on one link at once (a double click, or a retry that overtook
    its first): one click is stored, and every answer names it."""
    agents = [f"{BROWSER} double {n}" for n in range(4)]
    answers = await asyncio.gather(*(click(edge, agent=a) for a in agents for _ in range(6)))
    assert all(status == 200 for status, _ in answers), answers
    ids = [out["clickId"] for _, out in answers]
    for n in range(len(agents)):
        assert len(set(ids[n * 6 : (n + 1) * 6])) == 1, ids  # each browser: one id
    assert len(set(ids)) == len(agents)  # and one per browser
    await drain()
    rows = await pg.fetch("SELECT 'clk_' || replace(event_id::text, '-', '') AS id FROM events WHERE type = 1")
    assert sorted(r["id"] for r in rows) == sorted(set(ids))


async def test_a_click_refused_in_dubs_shape(edge: str, world: World, redis, keys: Keys):
    status, out, _ = await call("POST", f"{edge}/track/click", json={"domain": "yoursite.com", "key": "nope"})
    assert status == 404
    dub_error(out, "not_found")
    status, out, _ = await call("POST", f"{edge}/track/click", json={"domain": "other.example", "key": "PARTNER123"})
    assert status == 404  # a key names a link on its own domain only
    dub_error(out, "not_found")
    status, out, _ = await call("POST", f"{edge}/track/click", json={"domain": "yoursite.com"})
    assert status == 422
    dub_error(out, "unprocessable_entity")
    status, out, _ = await call("POST", f"{edge}/track/click", data=b"{not json")
    assert status == 400
    dub_error(out, "bad_request")
    assert sum([await redis.xlen(keys.stream(p)) for p in range(keys.partitions)]) == 0


@pytest.mark.parametrize(
    ("allowed", "source", "admitted"),
    [
        ((), None, True),
        (("example.com",), "https://example.com", True),
        (("example.com",), "https://www.example.com/page", True),
        (("example.com",), "https://shop.example.com", False),
        (("*.example.com",), "https://shop.example.com", True),
        (("*.example.com",), "https://example.com", True),
        (("*.example.com",), "https://evilexample.com", False),
        (("https://shop.example.com",), "https://shop.example.com", True),
        (("https://shop.example.com",), "http://shop.example.com", False),
        (("example.com",), None, False),
        (("example.com",), "null", False),
    ],
)
def test_allowed_hostnames(allowed: tuple[str, ...], source: str | None, admitted: bool) -> None:
    class Req:
        headers = {"Origin": source} if source else {}

    assert allowed_host(allowed, Req()) is admitted  # type: ignore[arg-type]


async def test_a_click_from_a_page_the_workspace_does_not_allow(edge: str, world: World, pg: asyncpg.Pool, redis, keys):
    await pg.execute("UPDATE workspaces SET allowed_origins = '{*.good.example}' WHERE id = $1", world.workspace_id)
    info = await links.fetch(pg, "PARTNER123")
    assert info is not None
    await links.put(redis, keys, info)
    status, out = await click(edge, Origin="https://evil.example")
    assert status == 403
    dub_error(out, "forbidden")
    status, out = await click(edge, Referer="https://shop.good.example/landing")  # no Origin: the page's address
    assert status == 200 and out["clickId"]


async def test_the_click_route_has_its_own_rate_limit(settings, pg: asyncpg.Pool, redis, world: World):
    from ._world import start_edge

    runner, url = await start_edge(settings.model_copy(update={"track_click_rate_limit_per_min": 2}))
    try:
        answers = [await click(url, agent=f"{BROWSER} {i}") for i in range(3)]
    finally:
        await runner.cleanup()
    assert [a[0] for a in answers] == [200, 200, 429]
    dub_error(answers[2][1], "rate_limit_exceeded")


async def test_lead_old_field_names_and_quantity(edge: str, world: World, pg: asyncpg.Pool, drain):
    _, a = await click(edge, agent=BROWSER + " a")
    _, b = await click(edge, agent=BROWSER + " b")
    status, out = await lead(edge, world.api_key, clickId=a["clickId"], externalId="old-a", eventQuantity=3)
    assert status == 200 and out["customer"]["externalId"] == "old-a"
    assert set(out) == {"click", "link", "customer"}  # Dub's answer: no eventName
    status, out = await lead(edge, world.api_key, clickId=b["clickId"], customerId="old-b", mode="wait")
    assert status == 200 and out["customer"]["externalId"] == "old-b"
    status, out = await lead(edge, world.api_key, clickId=a["clickId"], customerExternalId="x", eventQuantity=0)
    assert status == 422
    dub_error(out, "unprocessable_entity")
    await drain()
    rows = await pg.fetch("SELECT customer_external_id, payload FROM events WHERE type = 2 ORDER BY 1")
    assert [r["customer_external_id"] for r in rows] == ["old-a", "old-b"]
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'PARTNER123'") == 4  # 3 + 1
    assert await pg.fetchval("SELECT sum(leads) FROM daily_stats") == 4
    assert await reconcile(pg, fix=False) == []  # the recount from the rows agrees


async def test_a_deferred_lead_counts_when_its_lead_comes(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain
):
    _, c = await click(edge)
    status, out = await lead(edge, world.api_key, clickId=c["clickId"], customerExternalId="dee", mode="deferred")
    assert status == 200 and out["click"] == {"id": c["clickId"]}
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 2") == 0  # deferred: nothing yet
    assert await redis.exists(keys.deferred(world.workspace_id, "dee"))
    status, out = await lead(edge, world.api_key, clickId="", customerExternalId="dee")  # the click: the deferred one's
    assert status == 200 and out["click"] == {"id": c["clickId"]}
    await drain()
    row = await pg.fetchrow("SELECT 'clk_' || replace(click_id::text, '-', '') AS click FROM events WHERE type = 2")
    assert row["click"] == c["clickId"]
    status, out = await lead(edge, world.api_key, clickId="", customerExternalId="nobody")
    assert status == 400
    dub_error(out, "bad_request")


async def test_an_empty_click_id_finds_the_customers_click_in_postgres(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain
):
    _, c = await click(edge)
    assert (await lead(edge, world.api_key, clickId=c["clickId"], customerExternalId="pat"))[0] == 200
    await drain()
    status, out = await lead(edge, world.api_key, clickId=None, customerExternalId="pat", eventName="Upgrade")
    assert status == 200 and out["click"] == {"id": c["clickId"]}
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 2 AND customer_external_id = 'pat'") == 2


async def test_an_erasure_forgets_a_deferred_leads_click(edge: str, world: World, pg: asyncpg.Pool, redis, keys):
    _, c = await click(edge)
    await lead(edge, world.api_key, clickId=c["clickId"], customerExternalId="gone", mode="deferred")
    assert await redis.exists(keys.deferred(world.workspace_id, "gone"))
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, _, _ = await call("DELETE", f"{edge}/v1/customers/gone", headers=bearer(eraser))
    assert status == 202
    assert not await redis.exists(keys.deferred(world.workspace_id, "gone"))


async def test_leads_refused_in_dubs_shape(edge: str, world: World, pg: asyncpg.Pool):
    status, out = await lead(edge, "rs_live_nope", clickId=UNKNOWN_CLICK, customerExternalId="u")
    assert status == 401
    dub_error(out, "unauthorized")
    status, out = await lead(edge, world.api_key, clickId=UNKNOWN_CLICK, customerExternalId="u")
    assert status == 404
    dub_error(out, "not_found")
    status, out = await lead(edge, world.api_key, clickId=UNKNOWN_CLICK)  # no customer by any name
    assert status == 422
    dub_error(out, "unprocessable_entity")


async def test_direct_sale_tracking(edge: str, world: World, pg: asyncpg.Pool, drain):
    _, c = await click(edge)
    sale = {
        "customerExternalId": "dora",
        "amount": 1200,
        "currency": "EUR",
        "invoiceId": "inv-d",
        "clickId": c["clickId"],
        "customerName": "Dora",
        "paymentProcessor": "apple",
    }
    status, out, _ = await call("POST", f"{edge}/track/sale", json=sale, headers=bearer(world.api_key))
    assert status == 200, out
    assert out["customer"] == {"id": "dora", "externalId": "dora", "name": "Dora", "email": None, "avatar": None}
    assert out["sale"]["amount"] == 1200 and out["sale"]["paymentProcessor"] == "apple"
    await drain()
    lead_row = await pg.fetchrow("SELECT event_id, name FROM events WHERE type = 2 AND customer_external_id = 'dora'")
    assert lead_row["name"] == "Direct sale tracking lead event"
    sold = await pg.fetchrow("SELECT lead_event_id, amount, currency FROM sales WHERE invoice_id = 'inv-d'")
    assert (sold["lead_event_id"], sold["amount"], sold["currency"]) == (lead_row["event_id"], 1200, "eur")
    # a known customer's next direct sale makes no second lead
    again = {**sale, "invoiceId": "inv-d2"}
    assert (await call("POST", f"{edge}/track/sale", json=again, headers=bearer(world.api_key)))[0] == 200
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 2 AND customer_external_id = 'dora'") == 1
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE customer_external_id = 'dora'") == 2
    unknown = {**sale, "invoiceId": "inv-d3", "clickId": UNKNOWN_CLICK}
    status, out, _ = await call("POST", f"{edge}/track/sale", json=unknown, headers=bearer(world.api_key))
    assert status == 404
    dub_error(out, "not_found")
