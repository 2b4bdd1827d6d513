"""Money holds for the life of the rule (docs/guarantees.md, *Commissions*), through the edge, the
worker's batch transaction and Postgres: a sale earns by its program's duration however long
after the cookie window (``lifetime``; ``months`` from the customer's first lead), flat
amounts per currency in each currency's minor unit (USD 2 decimals, JPY 0, KWD 3), a
customer's lead earns ``lead_flat`` once, and the ledger equals the rules applied to the
whole history (``ingest.contract.earnings``, ``refstream commission check``)."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import currency, earnings, wire
from ingest.contract.commission import Rules
from ingest.contract.keys import Keys
from ingest.manage import db
from workers.consumer import store
from workers.ops.ledger_check import check

from ._world import World
from .test_commissions import rules
from .test_sales import made, sale_body, track_sale
from .test_seed_004_refport import lead, lead_body, new_click

DAY_MS = 86_400_000


async def _lead_ms(pg: asyncpg.Pool, customer: str = "user_001") -> int:
    at = await pg.fetchval("SELECT min(received_at) FROM events WHERE type = 2 AND customer_external_id = $1", customer)
    return int(at.timestamp() * 1000)


async def _earned(pg: asyncpg.Pool) -> list[tuple[str, int, str]]:
    return [tuple(r) for r in await pg.fetch("SELECT kind, amount, currency FROM commissions ORDER BY seq")]


async def test_lifetime_pays_for_a_sale_long_past_the_cookie_window(edge: str, world: World, pg: asyncpg.Pool, drain):
    """The reproduction: 10% for a customer's lifetime, a 45-day cookie window; the customer
    whose lead is 60 days old buys for 10,000 and earns 1,000 (on main: ``no_lead``, 0).
    A sale years later earns too, and so does one stored before a lead that precedes it."""
    await pg.execute("UPDATE programs SET cookie_window_days = 45 WHERE id = $1", world.program_id)
    assert (await rules(edge, world, sale_bps=1000, duration="lifetime"))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    lead_ms = await _lead_ms(pg)
    sixty, years = made(world, invoiceId="in_60", amount=10_000), made(world, invoiceId="in_3y", amount=20_000)
    sixty.received_at_ms, years.received_at_ms = lead_ms + 60 * DAY_MS, lead_ms + 3 * 365 * DAY_MS
    await store.write_batch(pg, [sixty, years])
    # a lead stored after its customer's sale, 90 days before it: attributes it, and it earns
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge), customerExternalId="user_002")))[0] == 200
    late = made(world, invoiceId="in_late", customerExternalId="user_002", amount=5_000)
    late.received_at_ms += 90 * DAY_MS
    await store.write_batch(pg, [late])
    await drain()
    attributed = {
        r["invoice_id"]: r["unattributed"] for r in await pg.fetch("SELECT invoice_id, unattributed FROM sales")
    }
    assert attributed == {"in_60": None, "in_3y": None, "in_late": None}
    assert sorted(await _earned(pg)) == [("sale", 500, "usd"), ("sale", 1000, "usd"), ("sale", 2000, "usd")]
    assert await check(pg) == []
    # past the event retention: the lead's event row is gone (its day's partition dropped),
    # the customer is still the affiliate's, and a sale four years on still earns
    await pg.execute("DELETE FROM events WHERE type = 2")
    later = made(world, invoiceId="in_4y", amount=30_000)
    later.received_at_ms = lead_ms + 4 * 365 * DAY_MS
    await store.write_batch(pg, [later])
    assert await pg.fetchval("SELECT unattributed FROM sales WHERE invoice_id = 'in_4y'") is None
    assert (
        await pg.fetchval(
            "SELECT c.amount FROM commissions c JOIN sales s ON s.event_id = c.source_id WHERE s.invoice_id = 'in_4y'"
        )
        == 3000
    )
    assert await check(pg) == []


async def test_months_count_from_the_customers_first_lead(edge: str, world: World, pg: asyncpg.Pool, drain):
    """``months: 1`` (30 days) from the FIRST lead: a sale 40 days after the first lead and 20
    after a second one earns nothing (on main it earned, counted from the newest lead)."""
    assert (await rules(edge, world, sale_bps=1000, duration="months", duration_months=1))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    first_ms = await _lead_ms(pg)
    second = lead_body(await new_click(edge), eventName="Trial")
    assert (await lead(edge, world.api_key, second))[0] == 200
    await drain()
    for table in ("events", "customer_leads"):  # the second lead 20 days after the first
        await pg.execute(
            f"UPDATE {table} SET received_at = $1::timestamptz + interval '20 days' WHERE name = 'Trial'",
            await pg.fetchval("SELECT min(received_at) FROM events WHERE type = 2"),
        )
    within, past = made(world, invoiceId="in_25", amount=1000), made(world, invoiceId="in_40", amount=2000)
    within.received_at_ms, past.received_at_ms = first_ms + 25 * DAY_MS, first_ms + 40 * DAY_MS
    await store.write_batch(pg, [within, past])
    lead_of = {
        r["invoice_id"]: r["name"]
        for r in await pg.fetch(
            "SELECT s.invoice_id, e.name FROM sales s JOIN events e ON e.event_id = s.lead_event_id"
        )
    }
    assert lead_of == {"in_25": "Trial", "in_40": "Trial"}  # the newest lead attributes; the first one times
    assert await _earned(pg) == [("sale", 100, "usd")]
    assert await check(pg) == []


async def test_an_older_lead_stored_after_a_months_sale_takes_it_back_when_it_is_now_past(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
):
    """``months: 1``: the customer's second lead (day 20) is stored first, a sale on day 40
    earns (20 days from the only lead known); the first lead (day 0) stored last makes the
    sale 40 days from the first lead: its commission, less its clawback, is taken back."""
    assert (await rules(edge, world, sale_bps=1000, duration="months", duration_months=1))[0] == 200
    for name in ("Sign Up", "Trial"):
        assert (await lead(edge, world.api_key, lead_body(await new_click(edge), eventName=name)))[0] == 200
    entries = [wire.from_entry(f) for s in keys.streams for _, f in await redis.xrange(s)]
    first, second = sorted(
        (e for e in entries if e.payload.get("name") in ("Sign Up", "Trial")), key=lambda e: e.received_at_ms
    )
    second.received_at_ms = first.received_at_ms + 20 * DAY_MS
    await store.write_batch(pg, [second])
    sale = made(world, invoiceId="in_40", amount=2000)
    sale.received_at_ms = first.received_at_ms + 40 * DAY_MS
    await store.write_batch(pg, [sale])
    assert await _earned(pg) == [("sale", 200, "usd")]
    await pg.execute("UPDATE sales SET refunded = 500")  # as if refunded in part: its clawback
    await pg.execute("""INSERT INTO commissions (workspace_id, program_id, affiliate_id, kind, rule, source_id, sale_id,
                                                 amount, currency, earned_at, approve_after)
                        SELECT workspace_id, program_id, affiliate_id, 'clawback', 'refund', gen_random_uuid(),
                               source_id, -50, currency, now(), now() FROM commissions""")
    await store.write_batch(pg, [first])
    await drain()  # the stream's copies: duplicates
    assert sorted(await _earned(pg)) == [("clawback", -50, "usd"), ("reversal", -150, "usd"), ("sale", 200, "usd")]
    assert await check(pg) == []


async def test_flat_amounts_are_per_currency_in_each_currencys_minor_unit(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """$5.00, ¥500 and 0.500 KWD, given in major units, are 500 minor units each; a sale in a
    currency the rules have no flat amount for (EUR) earns its share and no flat part (on
    main one number was every currency's: 500 was $5.00, ¥500 and 0.500 KWD alike)."""
    status, out = await rules(edge, world, sale_bps=1000, sale_flat={"usd": "5.00", "jpy": "500", "kwd": "0.500"})
    assert status == 200 and out["commission"]["sale_flat"] == {"jpy": 500, "kwd": 500, "usd": 500}, out
    for bad in (
        {"jpy": "5.5"},
        {"kwd": "0.0005"},
        {"usd": "5.001"},
        {"USD": 500},
        {"usd": -1},
        {"usd": True},
        {"usd": "five"},
        {"usd": 10**13},
        "500",
        [500],
    ):
        status, out = await rules(edge, world, sale_flat=bad)
        assert status == 400 and "error" in out, bad
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    for n, cur in enumerate(("usd", "jpy", "kwd", "eur")):
        assert (
            await track_sale(edge, world.api_key, sale_body(invoiceId=f"in_{cur}", amount=10_000 + n, currency=cur))
        )[0] == 200
    await drain()
    earned = {r["currency"]: r["amount"] for r in await pg.fetch("SELECT currency, amount FROM commissions")}
    # 10% of $100.00 + $5.00; of ¥10,001 + ¥500; of 10.002 KWD + 0.500 KWD; of €100.03, no flat part
    assert earned == {"usd": 1000 + 500, "jpy": 1000 + 500, "kwd": 1000 + 500, "eur": 1000}
    assert await check(pg) == []


async def test_an_older_single_flat_amount_reads_and_migrates_as_the_programs_currency(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """Rules stored before (``sale_flat``: one number) read as that number in the program's
    currency (lead_currency), and ``refstream migrate`` rewrites them so, once."""
    await pg.execute("""UPDATE programs SET commission = '{"sale_bps": 0, "sale_flat": 25, "lead_currency": "jpy"}'""")
    assert Rules.from_json({"sale_flat": 25, "lead_currency": "jpy"}).sale_flat == {"jpy": 25}
    legacy = """UPDATE programs SET commission = '{"sale_bps": 0, "sale_flat": 25, "lead_currency": "jpy"}'"""
    status, out = await rules(edge, world, hold_days=1)  # not migrated yet: a change keeps it, as it reads
    assert status == 200 and out["commission"]["sale_flat"] == {"jpy": 25}, out
    await pg.execute(legacy)
    status, out = await rules(edge, world, sale_flat={"usd": 3})  # the mapping given replaces it
    assert status == 200 and out["commission"]["sale_flat"] == {"usd": 3}, out
    await pg.execute(legacy)
    async with pg.acquire() as conn:
        await db.migrate(conn)
        stored = await conn.fetchval("SELECT commission::text FROM programs WHERE id = $1", world.program_id)
        await db.migrate(conn)  # idempotent
        assert await conn.fetchval("SELECT commission::text FROM programs WHERE id = $1", world.program_id) == stored
    assert '"sale_flats": {"jpy": 25}' in stored and '"sale_flat"' not in stored
    status, out = await rules(edge, world, sale_flat=7)  # the older form through the API: the program's currency
    assert status == 200 and out["commission"]["sale_flat"] == {"jpy": 7}, out
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    for cur in ("jpy", "usd"):
        assert (await track_sale(edge, world.api_key, sale_body(invoiceId=f"in_{cur}", currency=cur)))[0] == 200
    await drain()
    assert await _earned(pg) == [("sale", 7, "jpy")]  # usd: no flat amount, no share: nothing


async def test_a_customers_lead_earns_lead_flat_once_whatever_order_its_leads_are_stored_in(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
):
    """Two lead events of one customer earn ``lead_flat`` once (on main: once per event
    name), by the first lead: a later one stored first earns, and is taken back when the
    first arrives. With ``lead_events``, each named event earns once, and others nothing."""
    assert (await rules(edge, world, lead_flat=300, lead_currency="usd"))[0] == 200
    for name in ("Sign Up", "Trial"):
        assert (await lead(edge, world.api_key, lead_body(await new_click(edge), eventName=name)))[0] == 200
    entries = [wire.from_entry(f) for s in keys.streams for _, f in await redis.xrange(s)]
    first, later = sorted(
        (e for e in entries if e.payload.get("name") in ("Sign Up", "Trial")), key=lambda e: e.received_at_ms
    )
    assert first.payload["name"] == "Sign Up"
    await store.write_batch(pg, [later])
    assert [(k, a) for k, a, _ in await _earned(pg)] == [("lead", 300)]  # the only lead so far
    await store.write_batch(pg, [first])
    await drain()  # both again: duplicates
    rows = {(r["kind"], r["source_id"], r["amount"]) for r in await pg.fetch("SELECT * FROM commissions")}
    assert rows == {("lead", later.event_id, 300), ("reversal", later.event_id, -300), ("lead", first.event_id, 300)}
    assert await pg.fetchval("SELECT sum(amount) FROM commissions") == 300
    assert await check(pg) == []
    # named events: each earns once per customer, another name nothing
    assert (await rules(edge, world, lead_events=["Sign Up", "Trial"]))[0] == 200
    for name in ("Sign Up", "Trial", "Webinar"):
        body = lead_body(await new_click(edge), eventName=name, customerExternalId="user_002")
        assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    assert await pg.fetchval("SELECT sum(amount) FROM commissions WHERE customer_external_id = 'user_002'") == 600
    assert (await rules(edge, world, lead_events=[""]))[0] == 400


async def test_the_ledger_check_names_a_row_that_differs_from_the_rules(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """``refstream commission check`` (``workers.ops.ledger_check``): the rules applied to the
    history by the pure function, against the ledger netted per sale and lead."""
    assert (await rules(edge, world, sale_bps=1500, sale_flat={"usd": 25}, lead_flat=100))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    assert (await track_sale(edge, world.api_key, sale_body(amount=1234)))[0] == 200
    await drain()
    assert await check(pg) == []
    assert await check(pg, world.workspace_id) == []
    await pg.execute("UPDATE commissions SET amount = amount + 1 WHERE kind = 'sale'")
    [wrong] = await check(pg)
    assert (wrong.kind, wrong.expected, wrong.stored) == ("sale", (1234 * 1500 // 10_000 + 25, "usd"), (211, "usd"))


def test_the_pure_rules_over_a_history():
    """``earnings.expected`` by hand: lifetime with a refund, months from the first lead,
    first_sale, a lead once per customer, imported history that earns nothing."""
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    life, months, first = "p-life", "p-months", "p-first"
    rules_ = {
        life: Rules.from_json({"sale_bps": 1000, "sale_flat": {"jpy": 50}, "lead_flat": 300}),
        months: Rules.from_json({"sale_bps": 1000, "duration": "months", "duration_months": 1}),
        first: Rules.from_json({"sale_bps": 1000, "duration": "first_sale"}),
    }
    ids = [uuid4() for _ in range(12)]

    def lead_(i: int, program: str, days: int, name: str = "signup", dialect: str = "refport") -> earnings.Lead:
        return earnings.Lead(ids[i], "w", "c", name, program, t0 + timedelta(days=days), dialect)

    def sale_(
        i: int,
        program: str | None,
        days: int,
        amount: int = 10_000,
        cur: str = "usd",
        refunded: int = 0,
        dialect: str = "refport",
    ) -> earnings.Sale:
        return earnings.Sale(ids[i], "w", "c", program, amount, cur, refunded, t0 + timedelta(days=days), dialect)

    leads = [
        lead_(0, life, 0),
        lead_(1, life, 5, "trial"),
        lead_(2, months, 0),
        lead_(3, months, 20, "trial"),
        lead_(4, first, 0, dialect="import"),
    ]
    sales = [
        sale_(5, life, 900, refunded=2_500),
        sale_(6, life, 1, amount=1000, cur="jpy"),
        sale_(7, months, 25),
        sale_(8, months, 40),
        sale_(9, first, 3, dialect="import"),
        sale_(10, first, 4),
        sale_(11, None, 1),
    ]
    got = earnings.expected(rules_, leads, sales)
    assert got == {
        ("lead", ids[0]): (300, "usd"),
        ("sale", ids[5]): (1000 - 250, "usd"),
        ("sale", ids[6]): (150, "jpy"),
        ("sale", ids[7]): (1000, "usd"),
    }
    assert earnings.expected(rules_, leads, sales, import_earns=True)[("sale", ids[9])] == (1000, "usd")
    rows = [
        earnings.Row("lead", ids[1], None, 300, "usd"),
        earnings.Row("reversal", ids[1], None, -300, "usd", "lead"),
        earnings.Row("lead", ids[0], None, 300, "usd"),
        earnings.Row("sale", ids[5], None, 1000, "usd"),
        earnings.Row("clawback", uuid4(), ids[5], -250, "usd"),
        earnings.Row("sale", ids[6], None, 150, "jpy"),
        earnings.Row("sale", ids[7], None, 1000, "usd"),
    ]
    assert earnings.differences(got, earnings.standing(rows)) == []
    assert earnings.differences(got, earnings.standing(rows[:-1])) == [(("sale", ids[7]), (1000, "usd"), None)]


@pytest.mark.parametrize(
    ("major", "code", "minor"),
    [
        ("5.00", "usd", 500),
        ("5", "usd", 500),
        ("500", "jpy", 500),
        ("0.500", "kwd", 500),
        ("0.5", "kwd", 500),
        ("1.2345", "clf", 12345),
    ],
)
def test_major_units_become_each_currencys_minor_units(major: str, code: str, minor: int):
    assert currency.to_minor(major, code) == minor
    assert currency.to_minor(currency.to_major(minor, code), code) == minor


@pytest.mark.parametrize(
    ("major", "code"), [("5.5", "jpy"), ("0.0005", "kwd"), ("1.001", "usd"), ("-1", "usd"), ("1e3", "usd"), ("", "usd")]
)
def test_an_amount_finer_than_its_currencys_minor_unit_is_refused(major: str, code: str):
    with pytest.raises(ValueError):
        currency.to_minor(major, code)


async def test_the_cli_sets_flat_amounts_per_currency_and_checks_the_ledger(
    procs, settings, world: World, pg: asyncpg.Pool
):
    from ._procs import CliError, env_for, run_command

    ws = ("--workspace", world.workspace_id)
    out = await procs.cli(
        "commission",
        "set",
        world.program_id,
        *ws,
        "--sale-flat",
        "usd=5.00",
        "--sale-flat",
        "JPY=500",
        "--sale-flat",
        "kwd=0.5",
        "--lead-event",
        "Sign Up",
    )
    assert out["commission"]["sale_flat"] == {"jpy": 500, "kwd": 500, "usd": 500}
    assert out["commission"]["lead_events"] == ["Sign Up"]
    for bad in ("jpy=0.5", "usd", "usd=-1"):
        try:
            await procs.cli("commission", "set", world.program_id, *ws, "--sale-flat", bad)
            raise AssertionError(f"--sale-flat {bad} was taken")
        except CliError as exc:
            assert "sale" in str(exc).replace("-", "_") and "Traceback" not in str(exc), bad
    assert (await procs.cli("commission", "check", *ws)) == {"differences": []}
    await store.write_batch(pg, [made(world, customerExternalId="nobody")])
    await pg.execute(
        """INSERT INTO commissions (workspace_id, program_id, affiliate_id, kind, rule, source_id,
                                                 amount, currency, earned_at, approve_after)
                        SELECT workspace_id, $1, $2, 'sale', 'lifetime', event_id, 99, 'usd', now(), now()
                        FROM sales""",
        world.program_id,
        world.affiliate_id,
    )
    code, out, _ = await run_command("commission", "check", *ws, "--json", env=env_for(settings), within_s=120)
    [wrong] = orjson.loads(out)["differences"]
    assert (code, wrong["kind"], wrong["expected"], wrong["stored"]) == (
        1,
        "sale",
        None,
        {"amount": 99, "currency": "usd"},
    )
