"""A sale of amount 0 (a 100 % coupon, a free trial's "purchase"; dub issue #3108) against
a real edge, worker and Postgres: every door stores it, and no rule pays on it: no flat
part, no share, and under ``first_sale`` it does not take the place of the customer's
first purchase. A refund of it has nothing to give back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from ingest.contract import earnings
from ingest.contract.commission import Rules
from ingest.contract.keys import Keys
from workers.ops import import_formats, imports
from workers.ops.ledger_check import check

from ._world import World, call
from .test_commissions import rules
from .test_sales import bearer, sale_body, track_sale
from .test_seed_004_refport import lead, lead_body, new_click

SALE_COMMISSIONS = "SELECT s.invoice_id, c.amount FROM commissions c JOIN sales s ON s.event_id = c.source_id"


async def _zero_through_every_door(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Callable[[], Awaitable[Any]]
) -> None:
    """A sale of 0 for user_001 through Refport, Affixo, the batch route and an import."""
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="z-refport", amount=0)))[0] == 200
    affixo = {"customer_id": "user_001", "amount": 0, "currency": "usd", "invoice_id": "z-affixo"}
    status, out, _ = await call("POST", f"{edge}/v1/track/conversion", headers=bearer(world.api_key), json=affixo)
    assert status == 200 and out["ok"] is True
    batch = [{"type": "sale", **sale_body(invoiceId="z-batch", amount=0)}]
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", headers=bearer(world.api_key), json=batch)
    assert status == 200 and out["accepted"] == 1
    await drain()  # the import gives way while live entries wait
    row = {
        "type": "sale",
        "id": "z-import",
        "timestamp": datetime.now(UTC).isoformat(),
        "customer_id": "user_001",
        "amount": 0,
        "invoice_id": "z-import",
    }
    opts = imports.Options(world.workspace_id, "test", commissions=True, share=1.0)
    done = await imports.Importer(pg, opts, imports.LiveBacklog(redis, keys, 4)).run([import_formats.row(1, row)])
    assert done.stored == 1


async def test_a_sale_of_nothing_is_stored_by_every_door_and_earns_nothing(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
):
    """The reproduction: ``sale_flat {"usd": "5.00"}`` paid 500 on a sale of 0. Now each
    door's sale of 0 is stored, attributed, and earns no row; a sale of 1000 beside them
    earns its share and its flat part; the ledger is what the rules say."""
    assert (await rules(edge, world, sale_bps=1000, sale_flat={"usd": "5.00"}, lead_flat=300))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    await _zero_through_every_door(edge, world, pg, redis, keys, drain)
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="paid", amount=1000)))[0] == 200
    await drain()
    stored = {r["invoice_id"]: (r["amount"], r["unattributed"]) for r in await pg.fetch("SELECT * FROM sales")}
    zero = {"z-refport", "z-affixo", "z-batch", "z-import"}
    assert stored == {**dict.fromkeys(zero, (0, None)), "paid": (1000, None)}
    assert [tuple(r) for r in await pg.fetch(SALE_COMMISSIONS)] == [("paid", 100 + 500)]
    assert await pg.fetchval("SELECT count(*) FROM commissions WHERE kind = 'lead'") == 1  # the lead's own
    assert await check(pg) == []


async def test_under_first_sale_a_sale_of_nothing_is_not_the_first_purchase(
    edge: str, world: World, pg: asyncpg.Pool, drain
):
    """A free trial's sale of 0, then the customer's first paid sale: the paid one earns,
    whichever order the worker stores them in; a second paid sale does not."""
    assert (await rules(edge, world, sale_bps=1000, sale_flat={"usd": 200}, duration="first_sale"))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="trial", amount=0)))[0] == 200
    await drain()
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="first", amount=5000)))[0] == 200
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="second", amount=7000)))[0] == 200
    await drain()
    assert [tuple(r) for r in await pg.fetch(SALE_COMMISSIONS)] == [("first", 500 + 200)]
    assert await check(pg) == []


async def test_a_refund_of_a_sale_of_nothing_gives_nothing_back(edge: str, world: World, pg: asyncpg.Pool, drain):
    assert (await rules(edge, world, sale_flat={"usd": 500}))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="free", amount=0)))[0] == 200
    await drain()
    refund = {"invoiceId": "free", "refundId": "re_1"}
    status, out, _ = await call("POST", f"{edge}/api/track/refund", headers=bearer(world.api_key), json=refund)
    assert status == 409 and out["error"]["code"] == "REFUND_EXCEEDS_SALE"
    assert await pg.fetchval("SELECT count(*) FROM refunds") == 0
    assert await pg.fetchval("SELECT count(*) FROM commissions") == 0
    assert await pg.fetchval("SELECT (amount, refunded) FROM sales") == (0, 0)


@given(
    bps=st.integers(0, 10_000),
    flat=st.dictionaries(st.sampled_from(["usd", "eur", "jpy"]), st.integers(1, 10**9), max_size=3),
    currency=st.sampled_from(["usd", "eur", "jpy", "kwd"]),
    duration=st.sampled_from(["lifetime", "months", "first_sale"]),
)
def test_no_rule_pays_on_nothing(bps: int, flat: dict[str, int], currency: str, duration: str):
    """``Rules.for_sale`` and the pure ledger (``earnings.expected``, what ``refstream
    commission check`` holds the ledger to) agree: a sale of 0 earns nothing, and under
    ``first_sale`` the next paid sale is the first purchase."""
    r = Rules.from_json({"sale_bps": bps, "sale_flat": flat, "duration": duration})
    assert r.for_sale(0, currency) == 0
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    zero, paid = uuid4(), uuid4()
    lead_ = earnings.Lead(uuid4(), "w", "c", "signup", "p", t0, "refport")
    sales = [
        earnings.Sale(zero, "w", "c", "p", 0, currency, 0, t0 + timedelta(days=1), "refport"),
        earnings.Sale(paid, "w", "c", "p", 10_000, currency, 0, t0 + timedelta(days=2), "refport"),
    ]
    got = earnings.expected({"p": r}, [lead_], sales)
    assert ("sale", zero) not in got
    owed = r.for_sale(10_000, currency)
    assert got.get(("sale", paid)) == ((owed, currency) if owed else None)
