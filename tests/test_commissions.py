"""The commission ledger against a real Redis and Postgres: rules through the management API,
a commission per counted sale and lead exactly once (redeliveries, replays, a sale stored
before its lead), each duration, the hold, and an affiliate key that reads only its own.
The expected sums are computed in SQL of this file's own over the sales rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from ingest.ledger import secretbox
from ingest.manage import admin
from workers.consumer import commissions, store

from ._world import World, call
from .test_sales import affiliate_keys, bearer, made, sale_body, track_sale
from .test_seed_004_refport import lead, lead_body, new_click
from .test_webhooks import make_webhook

# each affiliate's commission per currency as the rules say, from the sales rows alone
# ($1 the affiliate, $2 basis points, $3 the flat amount per sale)
EXPECTED = """
SELECT currency, sum(amount * $2::bigint / 10000 + $3::bigint) AS total
FROM sales WHERE affiliate_id = $1 GROUP BY 1 ORDER BY 1
"""
LEDGER = """
SELECT currency, sum(amount) AS total FROM commissions WHERE affiliate_id = $1 AND kind <> 'lead' GROUP BY 1 ORDER BY 1
"""


async def rules(edge: str, world: World, **given: object) -> tuple[int, dict[str, Any]]:
    status, out, _ = await call(
        "PATCH", f"{edge}/v1/programs/{world.program_id}/commission", headers=bearer(world.api_key), json=given
    )
    return status, out


async def test_rules_are_set_kept_and_checked(edge: str, world: World):
    status, out = await rules(edge, world, sale_bps=2000, hold_days=0)
    assert status == 200 and out["commission"]["sale_bps"] == 2000 and out["commission"]["hold_days"] == 0
    status, out = await rules(edge, world, lead_flat=500)  # the others kept
    assert status == 200 and (out["commission"]["sale_bps"], out["commission"]["lead_flat"]) == (2000, 500)
    for bad in (
        {"sale_bps": 10_001},
        {"sale_bps": "20"},
        {"duration": "forever"},
        {"percent": 20},
        {"lead_currency": "USD"},
        {"hold_days": -1},
    ):
        status, out = await rules(edge, world, **bad)
        assert status == 400, bad
    status, _, _ = await call(
        "PATCH",
        f"{edge}/v1/programs/{world.link['id']}/commission",
        headers=bearer(world.api_key),
        json={"sale_bps": 1},
    )
    assert status == 404


async def test_each_counted_sale_and_lead_earns_once_by_the_rules(edge: str, world: World, pg: asyncpg.Pool, drain):
    assert (await rules(edge, world, sale_bps=2000, sale_flat={"usd": 100, "eur": 100}, lead_flat=500, hold_days=30))[
        0
    ] == 200
    click_id = await new_click(edge)
    for body in (lead_body(click_id), lead_body(click_id)):  # the second is no new lead: it earns nothing
        assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    for body in (
        sale_body(amount=4900),
        sale_body(invoiceId="in_2", amount=1001, currency="eur"),
        sale_body(invoiceId="in_2", amount=1001, currency="eur"),  # a repeat of an invoice
        sale_body(invoiceId="in_3", customerExternalId="nobody"),
    ):  # unattributed: nobody earns
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    ledger = [tuple(r) for r in await pg.fetch(LEDGER, world.affiliate_id)]
    assert ledger == [tuple(r) for r in await pg.fetch(EXPECTED, world.affiliate_id, 2000, 100)]
    assert ledger == [("eur", 300), ("usd", 1080)]  # 20% rounded down, plus 1.00
    assert await pg.fetchval("SELECT sum(amount) FROM commissions WHERE kind = 'lead'") == 500
    status, out, _ = await call("GET", f"{edge}/v1/links/{world.link['id']}/stats", headers=bearer(world.api_key))
    assert status == 200 and out["totals"]["commission"] == {"eur": 300, "usd": 1580}  # the lead's 500 too
    status, out, _ = await call("GET", f"{edge}/v1/stats", headers=bearer(world.api_key))
    assert status == 200 and out["totals"]["commission"] == {"eur": 300, "usd": 1580}
    assert {r["status"] for r in await pg.fetch("SELECT status FROM commissions")} == {"pending"}
    # a copy of in_001 under a new event id, then a new sale delivered twice: one row more
    before = await pg.fetchval("SELECT count(*) FROM commissions")
    await store.write_batch(pg, [made(world, amount=4900)])
    assert await pg.fetchval("SELECT count(*) FROM commissions") == before
    twice = made(world, invoiceId="in_4", amount=10)
    for _ in range(2):
        await store.write_batch(pg, [twice])
    assert await pg.fetchval("SELECT count(*) FROM commissions") == before + 1


async def test_a_sale_stored_before_its_lead_earns_when_the_lead_attributes_it(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    assert (await rules(edge, world, sale_bps=1000))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await store.write_batch(pg, [made(world, amount=5000)])  # received after the lead, stored before it
    assert await pg.fetchval("SELECT count(*) FROM commissions") == 0
    await drain()
    assert [tuple(r) for r in await pg.fetch("SELECT kind, amount FROM commissions")] == [("sale", 500)]


async def test_first_sale_only_whatever_order_they_are_stored_in(edge: str, world: World, pg: asyncpg.Pool, drain):
    assert (await rules(edge, world, sale_bps=1000, duration="first_sale"))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    first = made(world, invoiceId="in_a", amount=1000)
    later = made(world, invoiceId="in_b", amount=9000)
    later.received_at_ms = first.received_at_ms + 60_000
    await store.write_batch(pg, [later])  # stored first: the customer's only sale so far, it earns
    assert await pg.fetchval("SELECT sum(amount) FROM commissions") == 900
    await store.write_batch(pg, [first])  # the first sale after all: it earns, the later one's is taken back
    rows = {(r["kind"], r["amount"]) for r in await pg.fetch("SELECT kind, amount FROM commissions")}
    assert rows == {("sale", 900), ("reversal", -900), ("sale", 100)}
    assert await pg.fetchval("SELECT sum(amount) FROM commissions") == 100
    await store.write_batch(pg, [first, later])  # replayed: nothing more
    assert await pg.fetchval("SELECT count(*) FROM commissions") == 3


async def test_months_bound_which_sales_earn(edge: str, world: World, pg: asyncpg.Pool, drain):
    assert (await rules(edge, world, sale_bps=1000, duration="months", duration_months=1))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    within, past = made(world, invoiceId="in_a", amount=1000), made(world, invoiceId="in_b", amount=2000)
    past.received_at_ms += int(timedelta(days=31).total_seconds() * 1000)  # the program's window is 60 days
    await store.write_batch(pg, [within, past])
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE link_id IS NOT NULL") == 2
    assert [tuple(r) for r in await pg.fetch("SELECT kind, amount FROM commissions")] == [("sale", 100)]


async def test_held_then_approved_and_an_affiliate_reads_only_its_own(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, drain
):
    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    assert (await track_sale(edge, world.api_key, sale_body(amount=1000)))[0] == 200
    await drain()
    assert await pg.fetchval("SELECT status FROM commissions") == "pending"
    assert await pg.execute(commissions.APPROVE) == "UPDATE 1"  # the workers' cron, on Postgres's clock
    await pg.execute("UPDATE programs SET commission = commission || '{\"hold_days\": 30}'")
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="in_2", amount=2000)))[0] == 200
    await drain()
    assert await pg.execute(commissions.APPROVE) == "UPDATE 0"  # held 30 days
    status, out, _ = await call("GET", f"{edge}/v1/commissions?status=approved", headers=bearer(world.api_key))
    assert status == 200 and [(c["amount"], c["status"]) for c in out["data"]] == [(100, "approved")]
    mine, theirs = await affiliate_keys(pg, redis, keys, world)
    status, out, _ = await call("GET", f"{edge}/v1/affiliate/commissions?limit=1", headers=bearer(mine["api_key"]))
    assert status == 200 and [c["amount"] for c in out["data"]] == [200] and out["next"]
    status, out, _ = await call(
        "GET", f"{edge}/v1/affiliate/commissions?before={out['next']}", headers=bearer(mine["api_key"])
    )
    assert status == 200 and [c["amount"] for c in out["data"]] == [100] and out["next"] is None
    # another affiliate's key, even naming this affiliate: nothing of it
    status, out, _ = await call(
        "GET", f"{edge}/v1/affiliate/commissions?affiliate_id={world.affiliate_id}", headers=bearer(theirs["api_key"])
    )
    assert status == 200 and out["data"] == []
    status, out, _ = await call("GET", f"{edge}/v1/commissions", headers=bearer(mine["api_key"]))
    assert status == 403  # the workspace's ledger takes a workspace key


async def test_the_cli_sets_rules_and_lists_the_ledger(procs, world: World, pg: asyncpg.Pool):
    from ._procs import CliError

    ws = ("--workspace", world.workspace_id)
    out = await procs.cli("commission", "set", world.program_id, *ws, "--sale-bps", "1500", "--duration", "first_sale")
    assert out["commission"]["sale_bps"] == 1500 and out["commission"]["duration"] == "first_sale"
    out = await procs.cli("commission", "set", world.program_id, *ws, "--hold-days", "7")  # the others kept
    assert (out["commission"]["sale_bps"], out["commission"]["hold_days"]) == (1500, 7)
    assert await pg.fetchval("SELECT commission->>'sale_bps' FROM programs WHERE id = $1", world.program_id) == "1500"
    try:
        await procs.cli("commission", "set", world.program_id, *ws, "--sale-bps", "20000")
        raise AssertionError("20000 basis points were taken")
    except CliError as exc:
        assert "sale_bps" in str(exc) and "Traceback" not in str(exc)
    await store.write_batch(pg, [made(world, customerExternalId="nobody")])  # unattributed: no commission
    assert (await procs.cli("commission", "list", *ws))["data"] == []


async def test_payouts_take_approved_commissions_once_and_carry_a_later_reversal(
    edge: str, world: World, pg: asyncpg.Pool, redis, keys, procs, drain
):
    assert (await rules(edge, world, sale_bps=1000, duration="first_sale", hold_days=0))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    first, later = made(world, invoiceId="in_a", amount=1000), made(world, invoiceId="in_b", amount=9000)
    eur = made(world, invoiceId="in_c", amount=5000, currency="eur")
    lead_ms = int((await pg.fetchval("SELECT received_at FROM events WHERE type = 2")).timestamp() * 1000)
    for n, e in enumerate((first, later, eur), start=1):  # received after the lead in this order, all past their hold
        e.received_at_ms = lead_ms + n
    await store.write_batch(pg, [later])  # earns 900, for now
    await pg.execute(commissions.APPROVE)
    url, body = f"{edge}/v1/payouts", {"affiliate_id": world.affiliate_id, "currency": "usd"}
    status, paid, _ = await call("POST", url, headers=bearer(world.api_key), json=body)
    assert status == 201 and (paid["amount"], paid["commissions"], paid["status"]) == (900, 1, "pending")
    status, again, _ = await call("POST", url, headers=bearer(world.api_key), json=body)
    assert (status, again["error"]) == (409, "conflict")  # nothing left to pay: never paid twice
    hook, _ = await make_webhook(
        pg, world.workspace_id, "https://hooks.example/h", secretbox.generate_key(), events=["payout.paid"]
    )
    for _ in range(2):  # marked paid twice: answered the same, one webhook
        status, out, _ = await call("POST", f"{url}/{paid['id']}/paid", headers=bearer(world.api_key))
        assert status == 200 and out["status"] == "paid" and out["paid_at"]
    hooks = await pg.fetch("SELECT webhook_id::text, payload FROM webhook_deliveries WHERE event_type = 'payout.paid'")
    assert [(h["webhook_id"], h["payload"]["id"], h["payload"]["amount"]) for h in hooks] == [(hook, paid["id"], 900)]
    assert {r["status"] for r in await pg.fetch("SELECT status FROM commissions")} == {"paid"}
    # the first sale arrives after the payout: it earns 100, and the paid 900 is taken back
    await store.write_batch(pg, [first, eur])
    await pg.execute(commissions.APPROVE)
    status, out, _ = await call("POST", url, headers=bearer(world.api_key), json=body)
    assert (status, out["error"]) == (409, "conflict")  # 100 - 900: the reversal waits for more
    unpaid = await pg.fetchval("SELECT sum(amount) FROM commissions WHERE payout_id IS NULL AND currency = 'usd'")
    assert unpaid == -800
    # the currencies apart: the eur commission (the first_sale rule is per customer, across currencies) is none
    assert await pg.fetchval("SELECT count(*) FROM commissions WHERE currency = 'eur'") == 0
    # an affiliate reads its own payouts; the CLI lists the same
    async with pg.acquire() as conn:
        mine = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], affiliate_id=world.affiliate_id
        )
    status, out, _ = await call("GET", f"{edge}/v1/affiliate/payouts", headers=bearer(mine["api_key"]))
    assert status == 200 and [p["id"] for p in out["data"]] == [paid["id"]]
    listed = await procs.cli("payouts", "list", "--workspace", world.workspace_id)
    assert [p["amount"] for p in listed["data"]] == [900]


async def test_the_cli_makes_and_pays_a_payout(procs, edge: str, world: World, pg: asyncpg.Pool, drain):
    from ._procs import CliError

    assert (await rules(edge, world, sale_bps=500, hold_days=0))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await store.write_batch(pg, [made(world, amount=2000)])
    await pg.execute(commissions.APPROVE)
    ws = ("--workspace", world.workspace_id)
    made_ = await procs.cli("payouts", "create", *ws, "--affiliate", world.affiliate_id, "--currency", "usd")
    assert made_["amount"] == 100
    assert (await procs.cli("payouts", "paid", made_["id"], *ws))["status"] == "paid"
    try:
        await procs.cli("payouts", "create", *ws, "--affiliate", world.affiliate_id, "--currency", "usd")
        raise AssertionError("a second payout of nothing was made")
    except CliError as exc:
        assert "no approved commission" in str(exc) and "Traceback" not in str(exc)


async def test_the_fault_checkers_ledger_check_sees_a_wrong_or_missing_row(
    edge: str, world: World, pg: asyncpg.Pool, settings, keys, drain, tmp_path
):
    """The generative test's ledger check (tests/faults/_checks.py), SQL of its own."""
    from .faults._checks import Checker
    from .faults._gen.ops import COMMISSION as C

    assert (await rules(edge, world, **C))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    assert (await track_sale(edge, world.api_key, sale_body(amount=1234)))[0] == 200
    await drain()
    check = Checker(settings.database_url, settings.redis_url, keys, tmp_path)
    args = (C["sale_bps"], C["sale_flat"], C["lead_flat"], C["lead_currency"])
    try:
        assert await check.ledger_problems(*args) == []
        await pg.execute("UPDATE commissions SET amount = amount + 1 WHERE kind = 'sale'")
        await pg.execute("DELETE FROM commissions WHERE kind = 'lead'")
        found = await check.ledger_problems(*args)
        assert len(found) == 2 and any("(210,usd)" in p for p in found), found  # 1234 * 15% + 25 = 210
    finally:
        await check.close()


async def test_the_ledgers_lists_refuse_what_they_cannot_read_in_their_shape(edge: str, world: World):
    h = bearer(world.api_key)
    for query, status in (
        ("before=%C2%B2", 404),
        ("before=99999999999999999999", 404),
        ("currency=%00", 400),
        ("status=lost", 400),
        ("affiliate_id=nope", 404),
    ):
        got, out, _ = await call("GET", f"{edge}/v1/commissions?{query}", headers=h)
        assert (got, "error" in out) == (status, True), query
    got, out, _ = await call("GET", f"{edge}/v1/conversions?customer_id=a%00b", headers=h)
    assert (got, out["error"]) == (400, "invalid_request")
    got, out, _ = await call("GET", f"{edge}/v1/payouts?before=%C2%B2", headers=h)
    assert got == 404


async def test_a_change_to_first_sale_takes_back_nothing_earlier_rules_granted(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    assert (await rules(edge, world, sale_bps=1000, duration="lifetime"))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    lead_ms = int((await pg.fetchval("SELECT received_at FROM events WHERE type = 2")).timestamp() * 1000)
    s1, s2, s3 = (made(world, invoiceId=f"in_{n}", amount=1000 * n) for n in (1, 2, 3))
    for n, e in enumerate((s1, s2, s3), start=1):
        e.received_at_ms = lead_ms + n
    await store.write_batch(pg, [s1, s2])  # lifetime: both earn
    assert (await rules(edge, world, duration="first_sale"))[0] == 200
    await store.write_batch(pg, [s3])  # not the first: nothing; and what lifetime granted stands
    rows = sorted((r["kind"], r["amount"], r["rule"]) for r in await pg.fetch("SELECT * FROM commissions"))
    assert rows == [("sale", 100, "lifetime"), ("sale", 200, "lifetime")]
