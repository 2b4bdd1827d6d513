"""Every ledger row derived from another row is in THAT row's currency (issue 64 #4): a
reversal takes a commission back in the currency it was earned in, a clawback its sale
commission's share in that commission's currency, a payout sums one currency. Rules change
between a customer's events (a lead, a sale, a refund, an import), in any order of storage:
the ledger nets, per source and per currency, to the rules in force when each row earned
(``ingest.contract.earnings``, given each row's rules)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.contract import earnings
from ingest.contract.commission import Rules
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.settings import Settings
from ingest.edge import sale as edge_sale
from ingest.ledger import refunds
from workers.consumer import store

from ._world import World
from .test_commissions import rules
from .test_import import import_cli
from .test_seed_004_refport import lead, lead_body, new_click

DAY_MS = 86_400_000


async def _nets(pg: asyncpg.Pool, customer: str | None = None) -> dict[str, int]:
    """The ledger's net per currency (a currency that nets nothing left out)."""
    rows = await pg.fetch(
        "SELECT currency, sum(amount) AS net FROM commissions WHERE $1::text IS NULL OR customer_external_id = $1"
        " GROUP BY currency",
        customer,
    )
    return {r["currency"]: r["net"] for r in rows if r["net"]}


async def test_a_reversal_takes_back_in_the_currency_the_lead_earned_in(
    edge: str, world: World, pg: asyncpg.Pool, settings: Settings, tmp_path: Path, drain: Any
) -> None:
    """The reproduction: ``lead_flat 200``, ``lead_currency usd``; a live lead earns 200 usd;
    ``lead_currency`` becomes eur and an older lead of the customer is imported: the live
    lead's commission is taken back in usd (it was -200 eur: the ledger netted +200 usd and
    -200 eur)."""
    assert (await rules(edge, world, lead_flat=200, lead_currency="usd", hold_days=0))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    assert await _nets(pg) == {"usd": 200}
    assert (await rules(edge, world, lead_currency="eur"))[0] == 200
    at = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    row = {
        "type": "lead",
        "id": "old",
        "timestamp": at,
        "link": world.link["code"],
        "customer_id": "user_001",
        "event_name": "Trial",
    }
    path = tmp_path / "older.ndjson"
    path.write_text(orjson.dumps(row).decode() + "\n")
    summary = await import_cli(settings, path, world)
    assert summary["stored"] == 1, summary
    got = [tuple(r) for r in await pg.fetch("SELECT kind, amount, currency FROM commissions ORDER BY seq")]
    assert got == [("lead", 200, "usd"), ("reversal", -200, "usd")]
    assert await _nets(pg) == {}  # the imported lead (history) earns nothing; the live one is taken back


async def test_a_first_lead_stored_under_no_lead_flat_still_takes_a_later_ones_back(
    world: World, pg: asyncpg.Pool
) -> None:
    """A later lead stored first earned ``lead_flat``; the customer's first lead, stored when
    the rules pay no ``lead_flat``, earns nothing and still takes the later one's back: the
    customer's leads earn what the first one's rules say, in whatever order they are stored."""
    customer = f"c-{secrets.token_hex(3)}"
    t0 = _now_ms() - 10 * DAY_MS
    await _set(pg, world, {"lead_flat": 300, "lead_currency": "jpy", "hold_days": 0})
    await store.write_batch(pg, [_lead(world, customer, "Trial", t0 + DAY_MS)])
    assert await _nets(pg, customer) == {"jpy": 300}
    await _set(pg, world, {"lead_flat": 0, "lead_currency": "usd", "sale_bps": 100})
    await store.write_batch(pg, [_lead(world, customer, "Sign Up", t0)])
    assert await _nets(pg, customer) == {}


# -- the property: rules change between a customer's events, stored in any order ---------

CURRENCIES = ("usd", "eur", "jpy")
rule_sets = st.builds(
    lambda bps, flats, lead_flat, lead_currency, hold: {
        "sale_bps": bps,
        "sale_flats": flats,
        "lead_flat": lead_flat,
        "lead_currency": lead_currency,
        "hold_days": hold,
    },
    st.sampled_from([0, 500, 1000, 2500]),
    st.dictionaries(st.sampled_from(CURRENCIES), st.sampled_from([0, 25, 300]), max_size=3),
    st.sampled_from([0, 100, 200, 700]),
    st.sampled_from(CURRENCIES),
    st.sampled_from([0, 30]),
)


@dataclass
class Plan:
    """One customer's history: its leads and sales (received at a day each, some imported),
    refunds of its sales, the order they are stored in and the rules in force at each step."""

    duration: str
    leads: list[tuple[int, bool]]  # (day, imported)
    sales: list[tuple[int, int, str, bool]]  # (day, amount, currency, imported)
    refunds: list[tuple[int, int]]  # (sale index, amount)
    order: list[tuple[str, int]]  # ("lead" | "sale" | "refund", index), in storage order
    rules: list[dict[str, Any]]  # before each step
    import_earns: bool
    ids: dict[tuple[str, int], UUID] = field(default_factory=dict)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    leads = draw(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=3))
    sales = draw(
        st.lists(
            st.tuples(
                st.integers(0, 60), st.sampled_from([0, 999, 10_000]), st.sampled_from(CURRENCIES), st.booleans()
            ),
            max_size=3,
        )
    )
    refunds_ = draw(
        st.lists(st.tuples(st.integers(0, max(len(sales) - 1, 0)), st.sampled_from([1, 500, 10_000])), max_size=2)
        if sales
        else st.just([])
    )
    steps = [("lead", i) for i in range(len(leads))] + [("sale", i) for i in range(len(sales))]
    order = draw(st.permutations(steps))
    # a refund goes after its sale is stored, anywhere from there on
    for n, (sale_index, _) in enumerate(refunds_):
        after = order.index(("sale", sale_index))
        order.insert(draw(st.integers(after + 1, len(order))), ("refund", n))
    return Plan(
        duration=draw(st.sampled_from(["lifetime", "first_sale", "months"])),
        leads=leads,
        sales=sales,
        refunds=refunds_,
        order=order,
        rules=[draw(rule_sets) for _ in order],
        # history that earns nothing (the import's default): with --commissions, an imported
        # sale earns only if the import's own batch attributes it, which the model cannot tell
        import_earns=False,
    )


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


async def _set(pg: asyncpg.Pool, world: World, given: dict[str, Any]) -> Rules:
    await pg.execute(
        "UPDATE programs SET commission = $2::text::jsonb WHERE id = $1::uuid",
        world.program_id,
        orjson.dumps(given).decode(),
    )
    return Rules.from_json(given)


def _lead(world: World, customer: str, name: str, at_ms: int, dialect: str = Dialect.REFPORT) -> Envelope:
    payload = {"code": world.link["code"], "name": name, "external_id": customer}
    return Envelope(EventType.LEAD, dialect, payload, world.workspace_id, received_at_ms=at_ms)


def _sale(
    world: World, customer: str, invoice: str, amount: int, currency: str, at_ms: int, imported: bool
) -> Envelope:
    body = {"customerExternalId": customer, "amount": amount, "currency": currency, "invoiceId": invoice}
    e = edge_sale.envelope(Dialect.REFPORT, world.workspace_id, edge_sale.from_refport(edge_sale.RefportSale(**body)))
    if imported:
        e = Envelope(EventType.SALE, earnings.IMPORT_DIALECT, e.payload, world.workspace_id, event_id=e.event_id)
    e.received_at_ms = at_ms
    return e


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=plans())
async def test_the_ledger_nets_to_each_rows_rules_per_currency_whatever_changed_between_events(
    plan: Plan, world: World, pg: asyncpg.Pool
) -> None:
    customer = f"c-{secrets.token_hex(4)}"
    t0 = _now_ms() - 90 * DAY_MS
    effects = store.Effects(imported=True, commissions=plan.import_earns)
    lead_rules: dict[int, Rules] = {}  # the rules in force when each lead was stored
    sale_rules: dict[int, Rules] = {}  # ... when each sale was attributed (stored, or its lead stored)
    stored_leads: set[int] = set()
    stored_sales: set[int] = set()
    for step, (kind, i) in enumerate(plan.order):
        r = await _set(pg, world, {**plan.rules[step], "duration": plan.duration, "duration_months": 1})
        if kind == "lead":
            day, imported = plan.leads[i]
            e = _lead(
                world,
                customer,
                f"lead-{i}",
                t0 + day * DAY_MS + i,
                earnings.IMPORT_DIALECT if imported else Dialect.REFPORT,
            )
            await store.write_batch(pg, [e], effects=effects if imported else store.LIVE)
            plan.ids[("lead", i)] = e.event_id
            lead_rules[i] = r
            stored_leads.add(i)
            for j in stored_sales - sale_rules.keys():  # attributed now, when received after this lead
                if plan.sales[j][0] * DAY_MS + 10 > day * DAY_MS + i:
                    sale_rules[j] = r
        elif kind == "sale":
            day, amount, currency, imported = plan.sales[i]
            e = _sale(world, customer, f"in-{customer}-{i}", amount, currency, t0 + day * DAY_MS + 10, imported)
            await store.write_batch(pg, [e], effects=effects if imported else store.LIVE)
            plan.ids[("sale", i)] = e.event_id
            stored_sales.add(i)
            if any(plan.leads[j][0] * DAY_MS + j < day * DAY_MS + 10 for j in stored_leads):
                sale_rules[i] = r
        else:
            sale_index, amount = plan.refunds[i]
            asked = refunds.Asked.keyed(
                world.workspace_id,
                f"r-{customer}-{i}",
                None,
                invoice_id=f"in-{customer}-{sale_index}",
                amount=amount,
                reason=None,
                dialect="refport",
            )
            async with pg.acquire() as conn:
                try:
                    await refunds.record(conn, asked)
                except refunds.RefundTooLarge:
                    pass  # past what is left of the sale: nothing recorded

    # the model: each row with the rules it earned under
    mine = "SELECT * FROM ({}) x WHERE x.customer = $2"
    leads = [
        earnings.Lead(**dict(r), rules=lead_rules[_index(plan, "lead", r["event_id"])])
        for r in await pg.fetch(mine.format(earnings.LEADS_SQL), world.workspace_id, customer)
    ]
    sales = [
        earnings.Sale(**dict(r), rules=sale_rules.get(_index(plan, "sale", r["event_id"])))
        for r in await pg.fetch(mine.format(earnings.SALES_SQL), world.workspace_id, customer)
    ]
    ledger = "SELECT kind, source_id, sale_id, amount, currency, rule FROM commissions WHERE customer_external_id = $1"
    rows = [earnings.Row(**dict(r)) for r in await pg.fetch(ledger, customer)]
    want = earnings.expected({}, leads, sales, import_earns=plan.import_earns)
    have = earnings.standing(rows)
    assert earnings.differences(want, have) == [], (plan, rows)
    assert earnings.nets(rows) == earnings.totals(want), (plan, rows)
    # a payout sums one currency: each currency's approved rows, never another's
    assert all(r.currency in CURRENCIES for r in rows)


def _index(plan: Plan, kind: str, event_id: UUID) -> int:
    return next(i for (k, i), e in plan.ids.items() if k == kind and e == event_id)
