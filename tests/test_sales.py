"""Sales through Refport's ``/api/track/sale``, Affixo's ``/v1/track/conversion`` and the
batch route's ``sale``, against a real Redis and Postgres: the answers, attribution to the
customer's lead (and a lead stored after its sale), unattributed sales and their drop, the
invoice counted once by every path and at any distance, and every refusal in its route's
shape."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from ingest.contract.events import Dialect, Envelope
from ingest.contract.settings import Settings
from ingest.edge import sale
from ingest.edge.idempotency import REPLAYED
from ingest.manage import admin
from workers.consumer import store
from workers.ops.reconcile import reconcile

from ._world import World, call, start_edge
from .test_seed_004_refport import lead, lead_body, new_click

NIL = "00000000-0000-0000-0000-000000000000"


def sale_body(**over: object) -> dict[str, Any]:
    return {
        "customerExternalId": "user_001",
        "amount": 4900,
        "currency": "USD",
        "eventName": "Purchase",
        "paymentProcessor": "stripe",
        "invoiceId": "in_001",
        "metadata": {"plan": "pro"},
        **over,
    }


def made(world: World, **over: object) -> Envelope:
    """A sale as the edge makes it from Refport's body, to store with ``store.write_batch``."""
    return sale.envelope(Dialect.REFPORT, world.workspace_id, sale.from_refport(sale.RefportSale(**sale_body(**over))))


async def track_sale(
    edge: str, key: str | None, body: object, **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    return await call("POST", f"{edge}/api/track/sale", json=body, headers={**hdrs, **headers})


async def test_a_sale_after_its_lead_is_attributed_through_it(edge: str, world: World, pg: asyncpg.Pool, drain):
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    status, out, _ = await track_sale(edge, world.api_key, sale_body())
    assert status == 200
    assert out == {
        "eventName": "Purchase",
        "customer": {"id": "user_001", "externalId": "user_001", "name": None, "email": None, "avatar": None},
        "sale": {
            "amount": 4900,
            "currency": "usd",
            "paymentProcessor": "stripe",
            "invoiceId": "in_001",
            "metadata": {"plan": "pro"},
        },
    }
    await drain()
    row = await pg.fetchrow("SELECT * FROM sales")
    lead_row = await pg.fetchrow("SELECT event_id, click_id FROM events WHERE type = 2")
    assert (row["amount"], row["currency"], row["invoice_id"], row["payment_processor"]) == (
        4900,
        "usd",
        "in_001",
        "stripe",
    )
    assert (str(row["link_id"]), str(row["affiliate_id"]), str(row["program_id"])) == (
        world.link["id"],
        world.affiliate_id,
        world.program_id,
    )
    assert (row["lead_event_id"], row["click_id"]) == (lead_row["event_id"], lead_row["click_id"])
    assert row["unattributed"] is None and row["metadata"] == {"plan": "pro"} and row["dialect"] == "refport"
    # (the sale's partition may be read before its lead's: a nil row moved and moved back)
    stats = await pg.fetch("SELECT link_id::text, currency, sales, amount FROM sale_stats WHERE sales <> 0")
    assert [tuple(r) for r in stats] == [(world.link["id"], "usd", 1, 4900)]
    assert await pg.fetchval("SELECT coalesce(sum(n), 0) FROM drop_stats WHERE reason = 'no_lead'") == 0


async def test_a_sale_without_a_lead_is_stored_unattributed_with_a_drop(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    status, _, _ = await track_sale(edge, world.api_key, sale_body(customerExternalId="nobody", invoiceId=None))
    assert status == 200
    await drain()
    row = await pg.fetchrow("SELECT * FROM sales")
    assert (row["unattributed"], row["link_id"], row["affiliate_id"]) == ("no_lead", None, None)
    assert [tuple(r) for r in await pg.fetch("SELECT link_id::text, sales, amount FROM sale_stats")] == [(NIL, 1, 4900)]
    drop = await pg.fetchrow("SELECT workspace_id::text, link_id::text, n FROM drop_stats WHERE reason = 'no_lead'")
    assert tuple(drop) == (world.workspace_id, NIL, 1)


async def test_a_lead_received_first_but_stored_after_its_sale_attributes_it(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """Processing order never decides: the sale is stored first (no lead yet: unattributed,
    a drop), then its lead, received earlier, attributes it and takes the drop back."""
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200  # in its stream, not stored yet
    later = sale.envelope(Dialect.REFPORT, world.workspace_id, sale.from_refport(sale.RefportSale(**sale_body())))
    await store.write_batch(pg, [later])
    assert await pg.fetchval("SELECT unattributed FROM sales") == "no_lead"
    assert await pg.fetchval("SELECT n FROM drop_stats WHERE reason = 'no_lead'") == 1
    await drain()  # the click and the lead
    row = await pg.fetchrow("SELECT * FROM sales")
    assert row["unattributed"] is None and str(row["link_id"]) == world.link["id"]
    assert row["lead_event_id"] == await pg.fetchval("SELECT event_id FROM events WHERE type = 2")
    assert await pg.fetchval("SELECT n FROM drop_stats WHERE reason = 'no_lead'") == 0
    assert await pg.fetchval("SELECT count(*) FROM event_drops") == 0
    stats = {
        r["link_id"]: (r["sales"], r["amount"])
        for r in await pg.fetch("SELECT link_id::text, sales, amount FROM sale_stats")
    }
    assert stats == {NIL: (0, 0), world.link["id"]: (1, 4900)}


async def test_a_sale_received_before_the_lead_stays_unattributed(edge: str, world: World, pg: asyncpg.Pool, drain):
    early = sale.envelope(Dialect.REFPORT, world.workspace_id, sale.from_refport(sale.RefportSale(**sale_body())))
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await store.write_batch(pg, [early])  # processed after its lead, received before it
    assert await pg.fetchval("SELECT unattributed FROM sales") == "no_lead"


DAY_MS = 86_400_000


async def test_a_sale_past_the_cookie_window_is_still_attributed_to_its_customers_lead(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """The program's cookie window (60 days here) decides whether a lead is credited to its
    click; a sale is its customer's lead's however long after, whichever of the two is
    stored first (docs/guarantees.md, *Sales*: attribution never depends on order)."""
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    lead_ms = int((await pg.fetchval("SELECT received_at FROM events WHERE type = 2")).timestamp() * 1000)
    within, past = made(world, invoiceId="in_45", amount=45), made(world, invoiceId="in_400", amount=400)
    within.received_at_ms, past.received_at_ms = lead_ms + 45 * DAY_MS, lead_ms + 400 * DAY_MS
    await store.write_batch(pg, [within, past])
    # and a lead stored after its sales: the same when it attributes them late
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id, customerExternalId="user_002")))[0] == 200
    late = [made(world, invoiceId=f"in_late_{days}", customerExternalId="user_002", amount=days) for days in (45, 400)]
    for e in late:  # made after the lead was received, on the edge's clock
        e.received_at_ms += e.payload["amount"] * DAY_MS
    await store.write_batch(pg, late)
    await drain()  # the lead of user_002
    rows = {
        r["invoice_id"]: (r["unattributed"], r["link_id"] and str(r["link_id"]))
        for r in await pg.fetch("SELECT invoice_id, unattributed, link_id FROM sales")
    }
    assert rows == {invoice: (None, world.link["id"]) for invoice in ("in_45", "in_400", "in_late_45", "in_late_400")}
    assert not await pg.fetchval("SELECT sum(n) FROM drop_stats WHERE reason = 'no_lead'")
    stats = {
        r["link_id"]: (r["sales"], r["amount"])
        for r in await pg.fetch(
            "SELECT link_id::text, sum(sales) AS sales, sum(amount) AS amount FROM sale_stats GROUP BY 1"
        )
    }
    assert stats.get(world.link["id"]) == (4, 45 + 400 + 45 + 400) and stats.get(NIL, (0, 0)) == (0, 0)


async def test_a_sale_naming_its_lead_event_is_attributed_to_that_lead_only(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """``leadEventName`` picks the customer's lead of that name, never a newer one of another
    name, whether the leads are stored before the sale or after it."""
    click_id = await new_click(edge)
    for name in ("Sign Up", "Trial"):  # Trial the newer: stored after Sign Up was
        assert (await lead(edge, world.api_key, lead_body(click_id, eventName=name)))[0] == 200
        await drain()
    for body in (
        sale_body(invoiceId="in_named", leadEventName="Sign Up"),
        sale_body(invoiceId="in_any"),
        sale_body(invoiceId="in_other", leadEventName="Demo"),
    ):
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    # user_002's sale, naming Sign Up, stored before both its leads (received after them)
    early = made(world, invoiceId="in_early", customerExternalId="user_002", leadEventName="Sign Up")
    early.received_at_ms += 10 * 60_000
    await store.write_batch(pg, [early])
    for name in ("Sign Up", "Trial"):
        body = lead_body(click_id, eventName=name, customerExternalId="user_002")
        assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    leads = {
        (r["customer_external_id"], r["name"]): r["event_id"]
        for r in await pg.fetch("SELECT customer_external_id, name, event_id FROM events WHERE type = 2")
    }
    assert len(leads) == 4
    rows = {
        r["invoice_id"]: (r["lead_event_id"], r["unattributed"])
        for r in await pg.fetch("SELECT invoice_id, lead_event_id, unattributed FROM sales")
    }
    assert rows == {
        "in_named": (leads[("user_001", "Sign Up")], None),
        "in_any": (leads[("user_001", "Trial")], None),  # naming none: the newest
        "in_other": (None, "no_lead"),  # naming one the customer has not
        "in_early": (leads[("user_002", "Sign Up")], None),
    }


async def test_one_invoice_counts_once_by_every_route_and_weeks_apart(edge: str, world: World, pg: asyncpg.Pool, drain):
    first = await track_sale(edge, world.api_key, sale_body())
    again = await track_sale(edge, world.api_key, sale_body(amount=1))  # answered as the first
    assert first[0] == again[0] == 200 and again[1] == first[1] and again[2].get(REPLAYED) == "true"
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    status, out, _ = await call(
        "POST",
        f"{edge}/v1/track/conversion",
        headers=bearer,
        json={"customer_id": "user_001", "amount": 4900, "invoice_id": "in_001"},
    )
    assert status == 200 and out["ok"] is True and out["invoice_id"] == "in_001"
    status, out, _ = await call(
        "POST",
        f"{edge}/v1/events/batch",
        headers=bearer,
        json=[{"type": "sale", **sale_body()}, {"type": "sale", **sale_body()}],
    )
    assert status == 200 and out["accepted"] == 2
    assert out["results"][1]["event_id"] == out["results"][0]["event_id"]  # a repeat within the batch
    totals = await drain()
    assert totals["inserted"] == 1
    # weeks later, past any key window: Postgres still holds the invoice
    weeks = sale.envelope(Dialect.REFPORT, world.workspace_id, sale.from_refport(sale.RefportSale(**sale_body())))
    weeks.received_at_ms += int(timedelta(days=40).total_seconds() * 1000)
    assert (await store.write_batch(pg, [weeks])).inserted == 0
    assert await pg.fetchval("SELECT count(*) FROM sales") == 1
    assert await pg.fetchval("SELECT amount FROM sales") == 4900
    assert await pg.fetchval("SELECT sum(sales) FROM sale_stats") == 1
    # Affixo's copy, the batch's (its second item was its first's repeat) and the one weeks later
    assert await pg.fetchval("SELECT sum(n) FROM drop_stats WHERE reason = 'duplicate'") == 3


async def test_eight_copies_at_once_to_two_edges_one_without_redis_count_once(
    settings: Settings, world: World, pg: asyncpg.Pool, drain
):
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "spool_dir": settings.spool_dir + "-b"})
    up, up_url = await start_edge(settings)
    down, down_url = await start_edge(dead)
    try:
        answers = await asyncio.gather(*(track_sale(url, world.api_key, sale_body()) for url in [up_url, down_url] * 4))
        ups, downs = answers[0::2], answers[1::2]
        assert {a[0] for a in ups} == {200} and len({repr(a[1]) for a in ups}) == 1
        assert {a[0] for a in downs} == {503}  # refused: Redis down and a keyed route does not spool
        assert all(a[2].get("Retry-After") == "1" for a in downs)
        # the refused copies retried where Redis answers: the first answer, nothing new
        for _ in range(4):
            status, out, headers = await track_sale(up_url, world.api_key, sale_body())
            assert (status, out, headers.get(REPLAYED)) == (200, ups[0][1], "true")
    finally:
        await up.cleanup()
        await down.cleanup()
    assert (await drain())["inserted"] == 1
    assert await pg.fetchval("SELECT count(*) FROM sales") == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"amount": 49.99}, "amount"),
        ({"amount": "4900"}, "amount"),
        ({"amount": -1}, "amount"),
        ({"amount": True}, "amount"),
        ({"currency": "dollars"}, "currency"),
        ({"paymentProcessor": "cash"}, "paymentProcessor"),
        ({"customerExternalId": ""}, "customerExternalId"),
        ({"customerExternalId": "a\x00b"}, "customerExternalId"),
    ],
)
async def test_a_bad_sale_is_refports_400(edge: str, world: World, body: dict[str, Any], needle: str, pg, drain):
    status, out, _ = await track_sale(edge, world.api_key, sale_body(**body))
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR" and needle in out["error"]["message"]


async def test_refusals_in_each_routes_shape(edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain):
    status, out, _ = await track_sale(edge, None, sale_body())
    assert (status, out) == (401, {"error": {"code": "UNAUTHORIZED", "message": "Invalid or missing API key"}})
    async with pg.acquire() as conn:
        read_only = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    url = f"{edge}/v1/track/conversion"
    status, out, _ = await call(
        "POST", url, headers=bearer(read_only["api_key"]), json={"customer_id": "u", "amount": 1}
    )
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "track"})
    status, out, _ = await call("POST", url, headers=bearer(world.api_key), json={"customer_id": "u", "amount": 1.5})
    assert status == 400 and out["error"] == "invalid_json" and "amount" in out["detail"]
    batch = [{"type": "sale", "customerExternalId": "u"}]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", headers=bearer(world.api_key), json=batch)
    assert status == 200 and out["results"][0]["ok"] is False and out["results"][0]["error"] == "invalid"
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM sales") == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_reconcile_recounts_sales_and_revenue_per_currency(edge: str, world: World, pg: asyncpg.Pool, drain):
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    for body in (
        sale_body(),
        sale_body(invoiceId="in_2", amount=100, currency="eur"),
        sale_body(invoiceId="in_3", customerExternalId="nobody", amount=7),
    ):
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    assert await reconcile(pg, fix=False) == []
    await pg.execute("UPDATE sale_stats SET sales = sales + 2, amount = amount - 50 WHERE currency = 'usd'")
    await pg.execute("DELETE FROM sale_stats WHERE currency = 'eur'")
    found = {(d.code, d.counter): (d.stored, d.recomputed) for d in await reconcile(pg, fix=True)}
    assert found == {
        ("PARTNER123", "sales.usd"): (3, 1),
        ("PARTNER123", "revenue.usd"): (4850, 4900),
        ("PARTNER123", "sales.eur"): (0, 1),
        ("PARTNER123", "revenue.eur"): (0, 100),
        ("(unattributed)", "sales.usd"): (3, 1),
        ("(unattributed)", "revenue.usd"): (-43, 7),
    }
    assert await reconcile(pg, fix=False) == []
    totals = {
        tuple(r)
        for r in await pg.fetch("SELECT link_id::text, currency, sum(sales), sum(amount) FROM sale_stats GROUP BY 1, 2")
    }
    assert totals == {(world.link["id"], "usd", 1, 4900), (world.link["id"], "eur", 1, 100), (NIL, "usd", 1, 7)}


async def test_the_fault_checkers_counter_check_sees_sale_stats_drift(
    edge: str, world: World, pg: asyncpg.Pool, settings: Settings, keys, drain, tmp_path
):
    """The checker the fault suite and the generative test use (tests/faults/_checks.py),
    SQL of its own, against the rows the worker wrote, and against a hand edit."""
    from .faults._checks import Checker

    assert (await track_sale(edge, world.api_key, sale_body(customerExternalId="nobody")))[0] == 200
    await drain()
    check = Checker(settings.database_url, settings.redis_url, keys, tmp_path)
    try:
        assert [p for p in await check.counter_problems() if "sale_stats" in p] == []
        await pg.execute("UPDATE sale_stats SET amount = amount + 1")
        assert [p for p in await check.counter_problems() if "sale_stats" in p] == [
            f"I2: sale_stats {NIL} {await pg.fetchval('SELECT day FROM sale_stats')} usd: stored (1,4901,0,0), from"
            " sales (1,4900,0,0)"  # sales, revenue, refunds, refunded
        ]
    finally:
        await check.close()


async def test_link_and_affiliate_stats_count_sales_and_revenue_per_currency(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain
):
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    for body in (
        sale_body(),
        sale_body(invoiceId="in_2", amount=100, currency="eur"),
        sale_body(invoiceId="in_3", amount=51),
        sale_body(invoiceId="in_4", customerExternalId="nobody"),
    ):
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    status, out, _ = await call("GET", f"{edge}/v1/links/{world.link['id']}/stats", headers=bearer(world.api_key))
    assert status == 200
    assert (out["totals"]["sales"], out["totals"]["revenue"]) == ({"usd": 2, "eur": 1}, {"usd": 4951, "eur": 100})
    assert [(d["sales"], d["revenue"]) for d in out["daily"]] == [({"usd": 2, "eur": 1}, {"usd": 4951, "eur": 100})]
    mine, theirs = await affiliate_keys(pg, redis, keys, world)
    status, out, _ = await call("GET", f"{edge}/v1/affiliate/stats", headers=bearer(mine["api_key"]))
    assert status == 200 and out["totals"]["revenue"] == {"usd": 4951, "eur": 100}
    status, out, _ = await call("GET", f"{edge}/v1/affiliate/stats", headers=bearer(theirs["api_key"]))
    assert status == 200 and out["totals"]["sales"] == {} and out["totals"]["revenue"] == {}


async def test_each_stored_sale_is_one_sale_created_webhook(edge: str, world: World, pg: asyncpg.Pool, drain):
    from ingest.ledger import secretbox

    from .test_webhooks import make_webhook

    hook, _ = await make_webhook(
        pg, world.workspace_id, "https://hooks.example/h", secretbox.generate_key(), events=["sale.created"]
    )
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    for body in (sale_body(), sale_body(), sale_body(invoiceId=None, customerExternalId="nobody", amount=7)):
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    rows = await pg.fetch(
        "SELECT webhook_id::text, event_type, payload FROM webhook_deliveries ORDER BY (payload->>'amount')::int"
    )
    assert [(r["webhook_id"], r["event_type"]) for r in rows] == [(hook, "sale.created")] * 2  # the invoice once
    unattributed, attributed = (r["payload"] for r in rows)
    assert (unattributed["amount"], unattributed["link"]) == (7, None)
    assert unattributed["customer"] == {"external_id": "nobody"}
    assert (attributed["amount"], attributed["currency"], attributed["invoice_id"]) == (4900, "usd", "in_001")
    assert attributed["link"] == {
        "id": world.link["id"],
        "program_id": world.program_id,
        "affiliate_id": world.affiliate_id,
    }
    assert attributed["lead_event_id"] == str(await pg.fetchval("SELECT event_id FROM events WHERE type = 2"))


async def test_the_workspace_stats_show_unattributed_sales_and_their_drop(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain
):
    from ._world import make_world

    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    for key, body in (
        (world.api_key, sale_body(customerExternalId="nobody")),
        (other.api_key, sale_body(customerExternalId="nobody", amount=1)),
    ):
        assert (await track_sale(edge, key, body))[0] == 200
    await drain()
    status, out, _ = await call("GET", f"{edge}/v1/stats", headers=bearer(world.api_key))
    assert status == 200 and out["workspace_id"] == world.workspace_id
    assert (out["totals"]["sales"], out["totals"]["revenue"]) == ({"usd": 1}, {"usd": 4900})  # its own only
    assert out["totals"]["dropped"] == {"no_lead": 1}
    status, out, _ = await call("GET", f"{edge}/v1/stats?from=2020-01-01&to=2019-01-01", headers=bearer(world.api_key))
    assert status == 400 and out["error"] == "invalid_request"


async def test_conversions_list_newest_first_by_page_and_filter(edge: str, world: World, pg, redis, keys, drain):
    from ._world import make_world

    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    assert (await track_sale(edge, other.api_key, sale_body(customerExternalId="theirs")))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    for i in range(5):
        customer = "user_001" if i % 2 == 0 else "nobody"
        body = sale_body(invoiceId=f"in_{i}", amount=100 + i, customerExternalId=customer)
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    url = f"{edge}/v1/conversions"
    seen, before = [], None
    while True:
        status, out, _ = await call(
            "GET", url + "?limit=2" + (f"&before={before}" if before else ""), headers=bearer(world.api_key)
        )
        assert status == 200
        seen += out["data"]
        if (before := out["next"]) is None:
            break
    assert [s["invoice_id"] for s in seen] == ["in_4", "in_3", "in_2", "in_1", "in_0"]  # never another workspace's
    assert seen[0]["amount"] == 104 and seen[0]["link_id"] == world.link["id"] and seen[1]["unattributed"] == "no_lead"
    for query, invoices in (
        (f"link_id={world.link['id']}", ["in_4", "in_2", "in_0"]),
        (f"affiliate_id={world.affiliate_id}", ["in_4", "in_2", "in_0"]),
        ("customer_id=nobody", ["in_3", "in_1"]),
    ):
        status, out, _ = await call("GET", f"{url}?{query}", headers=bearer(world.api_key))
        assert status == 200 and [s["invoice_id"] for s in out["data"]] == invoices, query
    status, out, _ = await call("GET", f"{url}?limit=0", headers=bearer(world.api_key))
    assert status == 400 and out["error"] == "invalid_request"


async def test_a_copy_of_an_invoice_naming_another_customer_is_answered_as_the_first(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    first = await track_sale(edge, world.api_key, sale_body(customerExternalId="user_001"))
    other = await track_sale(edge, world.api_key, sale_body(customerExternalId="someone_else", amount=1))
    assert first[0] == other[0] == 200 and other[1] == first[1] and other[2].get(REPLAYED) == "true"
    await drain()
    assert [tuple(r) for r in await pg.fetch("SELECT customer_external_id, amount FROM sales")] == [("user_001", 4900)]


async def affiliate_keys(pg: asyncpg.Pool, redis, keys, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read keys of the world's affiliate and of another affiliate of its program."""
    async with pg.acquire() as conn:
        mine = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], affiliate_id=world.affiliate_id
        )
        other = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1, $2, 'other') RETURNING id",
            world.workspace_id,
            world.program_id,
        )
        theirs = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], affiliate_id=str(other)
        )
    return mine, theirs
