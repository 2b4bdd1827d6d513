"""Refunds against a real edge, Redis and Postgres: recorded as rows of their own, never past
their sale's amount (even when many arrive at once through two edges), idempotent on their
refundId or Idempotency-Key for ever, and their clawbacks pro rata in the commission ledger
(a sale refunded before it earned gets them when it does). The expected sums are computed in
SQL of this file's own over the sales and refunds rows."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from ingest.contract import wire
from ingest.contract.events import EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.edge import refund as refund_edge
from ingest.ledger import refunds, secretbox
from ingest.manage import admin
from workers.consumer import commissions, store
from workers.ops import replay
from workers.ops.reconcile import reconcile

from ._world import World, call, start_edge
from .test_commissions import rules
from .test_sales import bearer, made, sale_body, track_sale
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead, lead_body, new_click
from .test_webhooks import make_webhook

REFUND = "/api/track/refund"
# each sale's clawed total as the rules (basis points $2, flat $3) and its refunds say: the
# commission times the refunded share, rounded down ($1 the affiliate)
EXPECTED_CLAWED = """
SELECT s.currency, sum((s.amount * $2::bigint / 10000 + $3::bigint) * r.total::bigint / s.amount)::bigint AS clawed
FROM sales s JOIN (SELECT sale_id, sum(amount) AS total FROM refunds GROUP BY 1) r ON r.sale_id = s.event_id
WHERE s.affiliate_id = $1 GROUP BY 1 ORDER BY 1
"""
CLAWED = """
SELECT currency, (-sum(amount))::bigint AS clawed FROM commissions WHERE affiliate_id = $1 AND kind = 'clawback'
GROUP BY 1 ORDER BY 1
"""


async def refund(edge: str, api_key: str, body: dict[str, Any], key: str | None = None) -> tuple[int, Any, Any]:
    headers = {**bearer(api_key), **({"Idempotency-Key": key} if key else {})}
    return await call("POST", f"{edge}{REFUND}", json=body, headers=headers)


async def sold(edge: str, world: World, drain, **over: object) -> None:
    assert (await track_sale(edge, world.api_key, sale_body(**over)))[0] == 200
    await drain()


async def test_refunds_are_rows_of_their_own_and_never_pass_the_sale(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    await sold(edge, world, drain, invoiceId="in_r1", amount=5000)
    status, first, headers = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 2000, "refundId": "r1"})
    assert status == 200 and first["amount"] == 2000 and first["currency"] == "usd", first
    assert headers.get("Idempotent-Replayed") is None
    # the same refund again: the first answer, nothing more refunded
    again = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 2000, "refundId": "r1"})
    assert again[:2] == (200, first) and again[2].get("Idempotent-Replayed") == "true"
    # its id with another amount: refused in Refport's shape
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 1, "refundId": "r1"})
    assert (status, out["error"]["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), out
    # past what is left (3000): 409, and nothing recorded
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 3001, "refundId": "r2"})
    assert (status, out["error"]["code"]) == (409, "REFUND_EXCEEDS_SALE"), out
    # no amount: all that is left; then nothing is left
    status, rest, _ = await refund(edge, world.api_key, {"invoiceId": "in_r1"}, key="k-rest")
    assert status == 200 and rest["amount"] == 3000, rest
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 1, "refundId": "r3"})
    assert status == 409, out
    # refusals in Refport's shape: no such invoice, no key, a bad body
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_nope", "refundId": "r4"})
    assert (status, out["error"]["code"]) == (404, "SALE_NOT_FOUND"), out
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_r1", "amount": 1})
    assert (status, out["error"]["code"]) == (422, "REFUND_KEY_REQUIRED"), out
    for bad in (
        {"invoiceId": "in_r1", "amount": 1.5, "refundId": "x"},
        {"amount": 1, "refundId": "x"},
        {"invoiceId": "in_r1", "amount": 0, "refundId": "x"},
    ):
        status, out, _ = await refund(edge, world.api_key, bad)
        assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR", (bad, out)
    status, _, _ = await call("POST", f"{edge}{REFUND}", json={"invoiceId": "in_r1", "refundId": "x"})
    assert status == 401

    rows = await pg.fetch("SELECT amount FROM refunds ORDER BY seq")
    assert [r["amount"] for r in rows] == [2000, 3000]
    sale = await pg.fetchrow("SELECT amount, refunded, refunds FROM sales WHERE invoice_id = 'in_r1'")
    assert tuple(sale) == (5000, 5000, 2)  # the sale itself unchanged: its running totals beside it
    stats = await pg.fetchrow("SELECT sum(refunds) AS n, sum(refunded) AS total FROM sale_stats")
    assert (stats["n"], stats["total"]) == (2, 5000)
    status, listed, _ = await call("GET", f"{edge}/v1/conversions", headers=bearer(world.api_key))
    assert status == 200 and [(c["refunds"], c["refunded"]) for c in listed["data"]] == [(2, 5000)], listed


async def test_one_sale_refunded_at_once_through_two_edges_never_past_its_amount(
    edge: str, world: World, pg: asyncpg.Pool, settings: Settings, drain, tmp_path: Path
) -> None:
    await sold(edge, world, drain, invoiceId="in_race", amount=1000)
    runner, other = await start_edge(settings.model_copy(update={"spool_dir": str(tmp_path / "other")}))
    try:
        # 16 refunds of 100 each (ids r0..r7 sent twice each), half to each edge, all at once:
        # 8 distinct refunds fit the sale (800), their repeats are answered as the first
        answers = await asyncio.gather(
            *(
                refund(base, world.api_key, {"invoiceId": "in_race", "amount": 100, "refundId": f"r{i % 8}"})
                for i, base in enumerate([edge, other] * 8)
            )
        )
        # and 8 more of 100 each under new ids: only 2 fit what is left
        more = await asyncio.gather(
            *(
                refund(base, world.api_key, {"invoiceId": "in_race", "amount": 100, "refundId": f"more{i}"})
                for i, base in enumerate([edge, other] * 4)
            )
        )
    finally:
        await runner.cleanup()
    assert [a[0] for a in answers] == [200] * 16, answers
    by_id: dict[str, set[str]] = {}
    for a in answers:
        by_id.setdefault(a[1]["refund_id"], set()).add(a[1]["refund_id"])
    assert len(by_id) == 8  # each refundId one refund, whichever copy came first
    assert sorted(a[0] for a in more) == [200] * 2 + [409] * 6, more
    assert await pg.fetchval("SELECT sum(amount) FROM refunds") == 1000
    assert await pg.fetchval("SELECT refunded FROM sales WHERE invoice_id = 'in_race'") == 1000


async def test_clawbacks_take_back_the_refunded_share_of_the_commission(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    assert (await rules(edge, world, sale_bps=2000, sale_flat={"usd": 33, "eur": 33}, hold_days=0))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_c1", amount=999)
    await sold(edge, world, drain, invoiceId="in_c2", amount=4000, currency="eur")
    earned = {r["currency"]: r["amount"] for r in await pg.fetch("SELECT currency, amount FROM commissions")}
    assert earned == {"usd": 999 * 2000 // 10000 + 33, "eur": 800 + 33}
    for body in (
        {"invoiceId": "in_c1", "amount": 333, "refundId": "a"},
        {"invoiceId": "in_c1", "amount": 1, "refundId": "b"},
        {"invoiceId": "in_c2", "amount": 1000, "refundId": "c"},
    ):
        assert (await refund(edge, world.api_key, body))[0] == 200
    assert [tuple(r) for r in await pg.fetch(CLAWED, world.affiliate_id)] == [
        tuple(r) for r in await pg.fetch(EXPECTED_CLAWED, world.affiliate_id, 2000, 33)
    ]
    # refunded in full: all of its commission is taken back, to the minor unit
    assert (await refund(edge, world.api_key, {"invoiceId": "in_c1", "refundId": "d"}))[0] == 200
    net = await pg.fetchval("SELECT sum(amount) FROM commissions WHERE currency = 'usd'")
    assert net == 0
    # stats: the commission net of its clawbacks (none left in usd), the refunds beside the revenue
    status, out, _ = await call("GET", f"{edge}/v1/links/{world.link['id']}/stats", headers=bearer(world.api_key))
    assert status == 200 and out["totals"]["commission"] == {"eur": 833 - 833 * 1000 // 4000}, out
    assert out["totals"]["refunded"] == {"eur": 1000, "usd": 999}, out


async def test_a_sale_refunded_before_it_earned_gets_its_clawback_when_it_does(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    assert (await rules(edge, world, sale_bps=1000))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await store.write_batch(pg, [made(world, invoiceId="in_late", amount=5000)])  # before its lead is stored
    assert (await refund(edge, world.api_key, {"invoiceId": "in_late", "amount": 2500, "refundId": "l"}))[0] == 200
    assert await pg.fetchval("SELECT count(*) FROM commissions") == 0  # unattributed yet: nothing earned
    await drain()  # the lead: the sale earns, and its refund takes its share back
    rows = sorted(tuple(r) for r in await pg.fetch("SELECT kind, amount FROM commissions"))
    assert rows == [("clawback", -250), ("sale", 500)]
    # the refunds moved with the sale from the unattributed to its link
    moved = await pg.fetch("SELECT link_id, refunds, refunded FROM sale_stats WHERE refunds <> 0 OR refunded <> 0")
    assert [(str(r["link_id"]), r["refunds"], r["refunded"]) for r in moved] == [(world.link["id"], 1, 2500)]


async def test_the_batch_route_takes_refunds_each_in_its_turn(edge: str, world: World, pg: asyncpg.Pool, drain) -> None:
    await sold(edge, world, drain, invoiceId="in_b", amount=1000)
    items = [
        {"type": "refund", "invoiceId": "in_b", "amount": 600, "refundId": "b1"},
        {"type": "refund", "invoiceId": "in_b", "amount": 300, "idempotency_key": "b2"},
        {"type": "refund", "invoiceId": "in_b", "amount": 200, "refundId": "b3"},  # 100 left: refused
        {"type": "refund", "invoiceId": "in_none", "refundId": "b4"},
        {"type": "refund", "invoiceId": "in_b", "amount": 1},  # no key at all
    ]
    answers = [
        await call("POST", f"{edge}/v1/events/batch", json=items, headers=bearer(world.api_key)) for _ in range(2)
    ]
    status, out, headers = answers[0]
    assert status == 200 and (out["accepted"], out["rejected"]) == (2, 3), out
    assert [r.get("error") for r in out["results"]] == [
        None,
        None,
        "refund_exceeds_sale",
        "sale_not_found",
        "refund_key_required",
    ]
    assert headers.get("Idempotent-Replayed") is None
    # the same batch again: the two refunds answered as they were, nothing refunded twice
    status, again, headers = answers[1]
    assert status == 200 and again["results"][:2] == out["results"][:2], again
    assert headers.get("Idempotent-Replayed") == "true"
    assert [r["amount"] for r in await pg.fetch("SELECT amount FROM refunds ORDER BY seq")] == [600, 300]
    assert await pg.fetchval("SELECT refunded FROM sales WHERE invoice_id = 'in_b'") == 900


async def test_one_refund_id_for_two_sales_at_once_is_one_refund_and_a_422(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    for invoice in ("in_x", "in_y"):  # two customers: their refunds take different locks
        body = sale_body(invoiceId=invoice, customerExternalId=invoice)
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    for n in range(3):
        answers = await asyncio.gather(
            *(
                refund(edge, world.api_key, {"invoiceId": invoice, "amount": 1, "refundId": f"same-{n}"})
                for invoice in ("in_x", "in_y")
            )
        )
        assert sorted(a[0] for a in answers) == [200, 422], answers  # never a 503 for the key's race
    assert await pg.fetchval("SELECT count(*) FROM refunds") == 3


async def test_a_refunds_copy_rides_beside_its_sale_and_restores_it_once_where_postgres_lacks_it(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
) -> None:
    """What the archive and a replay carry of a refund: each 2xx appends a copy to its sale's
    partition; the workers take a copy of a recorded refund as a duplicate, and record one
    that Postgres lacks (restored from a backup, failed over onto a standby behind) as it
    was, once, however many copies they read."""
    await sold(edge, world, drain, invoiceId="in_copy", amount=5000)
    body = {"invoiceId": "in_copy", "amount": 1200, "reason": "damaged", "refundId": "c1"}
    status, first, _ = await refund(edge, world.api_key, body)
    assert status == 200, first
    assert (await refund(edge, world.api_key, body))[:2] == (200, first)  # a repeat: its copy too
    envelopes = {
        stream: [wire.from_entry(fields) for _, fields in await redis.xrange(stream)] for stream in keys.streams
    }
    copies = [(s, e) for s, es in envelopes.items() for e in es if e.type is EventType.REFUND]
    assert [e.event_id for _, e in copies] == [UUID(first["refund_id"])] * 2
    [sale_stream] = [s for s, es in envelopes.items() for e in es if e.type is EventType.SALE]
    assert {s for s, _ in copies} == {sale_stream}  # beside its sale, after it
    await drain()
    recorded = await pg.fetchrow("SELECT id, amount, reason, created_at, refund_key FROM refunds")
    assert await pg.fetchval("SELECT count(*) FROM refunds") == 1
    assert await pg.fetchval("SELECT refunded FROM sales WHERE invoice_id = 'in_copy'") == 1200

    # Postgres without the refund (as a restore from before it would be), its effects undone
    async with pg.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM commissions WHERE kind = 'clawback'")
        await conn.execute("DELETE FROM refunds")
        await conn.execute("UPDATE sales SET refunded = 0, refunds = 0")
        await conn.execute("UPDATE sale_stats SET refunds = 0, refunded = 0")
    for _ in range(2):  # both copies, read twice (a replay of a replay)
        await store.write_batch(pg, [e for _, e in copies])
    assert [tuple(r) for r in await pg.fetch("SELECT id, amount, reason, created_at, refund_key FROM refunds")] == [
        tuple(recorded)
    ]
    sale = await pg.fetchrow("SELECT refunded, refunds FROM sales WHERE invoice_id = 'in_copy'")
    assert tuple(sale) == (1200, 1)
    assert await pg.fetchval("SELECT sum(refunds) FROM sale_stats") == 1
    # the client's retry of the refund is still answered as the first
    assert (await refund(edge, world.api_key, body))[:2] == (200, first)
    # a copy whose sale Postgres does not hold is not restored, and said so
    stray = refund_edge.envelope(
        refunds.Asked(world.workspace_id, "id:stray", invoice_id="in_nowhere", amount=5, reason=None, dialect="native"),
        {**first, "refund_id": str(uuid7()), "invoice_id": "in_nowhere", "amount": 5},
    )
    result = await store.write_batch(pg, [stray])
    assert (result.inserted, result.refunds_not_restored) == (0, [stray])
    assert await pg.fetchval("SELECT count(*) FROM refunds") == 1


async def test_a_replay_restores_a_refund_whose_copy_it_reads_before_its_sale(
    world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """A change of the partition count between a sale and its refund puts them in two
    partitions, and a replay reads one partition after another: the copy read before its
    sale is tried again once every partition is read, and restored."""
    sale_env = made(world, invoiceId="in_apart", amount=3000)
    copy = refund_edge.envelope(
        refunds.Asked(world.workspace_id, "id:apart", invoice_id="in_apart", amount=700, reason=None, dialect="native"),
        {
            "refund_id": str(uuid7()),
            "invoice_id": "in_apart",
            "amount": 700,
            "currency": "usd",
            "reason": None,
            "created_at": "2026-11-25T07:00:00.123456+00:00",
        },
    )
    await redis.xadd(keys.streams[0], wire.to_entry_dict(copy))  # the copy in the first partition read
    await redis.xadd(keys.streams[-1], wire.to_entry_dict(sale_env))  # its sale in the last
    result = await replay.replay(redis, pg, keys, replay.Range())
    assert result.total("refunds_not_restored") == 0, result.to_dict()
    assert result.total("inserted") == 2
    row = await pg.fetchrow("SELECT id, amount, created_at FROM refunds WHERE refund_key = 'id:apart'")
    assert (row["id"], row["amount"], row["created_at"].isoformat()) == (
        copy.event_id,
        700,
        "2026-11-25T07:00:00.123456+00:00",
    )
    assert await pg.fetchval("SELECT refunded FROM sales WHERE invoice_id = 'in_apart'") == 700
    again = await replay.replay(redis, pg, keys, replay.Range())  # a second replay: nothing new
    assert (again.total("inserted"), again.total("duplicates")) == (0, 2)


async def test_a_refund_whose_copy_cannot_be_kept_is_answered_may_be_recorded(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, settings: Settings, drain, tmp_path: Path
) -> None:
    """Its partition gone from Redis and the spool full: the refund is recorded, but its copy
    is nowhere, so it is answered 503 ``Refstream-Outcome: unknown``, never 200; the retry
    with its key, once the partition is back, is answered as the first and appends the copy."""
    await sold(edge, world, drain, invoiceId="in_unkept", amount=900)
    [stream] = {s for s in keys.streams if await redis.xlen(s)}  # the sale's partition, the copy's
    own = settings.model_copy(update={"spool_dir": str(tmp_path / "spool"), "spool_max_bytes": 1})
    runner, full = await start_edge(own)
    try:
        await redis.delete(stream)  # XADD NOMKSTREAM refuses it (after the edge made its streams)
        body = {"invoiceId": "in_unkept", "amount": 400, "refundId": "u1"}
        status, out, headers = await refund(full, world.api_key, body)
        assert status == 503 and headers.get("Refstream-Outcome") == "unknown", (status, out, headers)
    finally:
        await runner.cleanup()
    assert await pg.fetchval("SELECT amount FROM refunds WHERE refund_key = 'id:u1'") == 400
    with contextlib.suppress(ResponseError):  # BUSYGROUP: the edge's layout watch made it again
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    status, first, _ = await refund(edge, world.api_key, body)  # the retry
    assert status == 200 and first["amount"] == 400, first
    [(_, fields)] = await redis.xrange(stream)
    assert wire.from_entry(fields).event_id == UUID(first["refund_id"])


async def test_a_refund_is_one_refund_created_delivery_and_its_clawback_one_commission_created(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    hook, _ = await make_webhook(
        pg,
        world.workspace_id,
        "https://hooks.example/h",
        secretbox.generate_key(),
        events=["refund.created", "commission.created"],
    )
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_w", amount=5000)
    assert [(h["event_type"], h["payload"]["kind"]) for h in await deliveries(pg)] == [("commission.created", "sale")]
    body = {"invoiceId": "in_w", "amount": 1500, "reason": "damaged", "refundId": "w1"}
    status, made_, _ = await refund(edge, world.api_key, body)
    assert status == 200, made_
    assert (await refund(edge, world.api_key, body))[0] == 200  # its repeat: no delivery more
    assert (await refund(edge, world.api_key, {"invoiceId": "in_w", "amount": 3501, "refundId": "w2"}))[0] == 409
    claw = await pg.fetchrow("SELECT id, amount FROM commissions WHERE kind = 'clawback'")
    assert claw["amount"] == -(500 * 1500 // 5000)
    got = [h for h in await deliveries(pg) if h["payload"].get("kind") != "sale"]
    assert [(h["webhook_id"], h["event_type"], h["subject_id"]) for h in got] == [
        (hook, "commission.created", claw["id"]),
        (hook, "refund.created", UUID(made_["refund_id"])),
    ]
    clawed, refunded = (h["payload"] for h in got)
    assert refunded == made_  # the refund as its answer said
    assert (clawed["kind"], clawed["amount"], clawed["currency"], clawed["source_event_id"]) == (
        "clawback",
        -150,
        "usd",
        made_["refund_id"],
    )
    assert (clawed["affiliate_id"], clawed["link_id"]) == (world.affiliate_id, world.link["id"])


async def deliveries(pg: asyncpg.Pool) -> list[asyncpg.Record]:
    """The outbox's rows, by type and then amount (the deliveries the workers send)."""
    return list(
        await pg.fetch(
            "SELECT webhook_id::text, event_type, subject_id, payload FROM webhook_deliveries"
            " ORDER BY event_type, (payload->>'amount')::bigint"
        )
    )


async def test_a_clawback_of_a_paid_commission_is_carried_into_the_next_payout(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_p1", amount=10_000)
    await pg.execute(commissions.APPROVE)
    url = f"{edge}/v1/payouts"

    async def pay() -> tuple[int, Any]:
        body = {"affiliate_id": world.affiliate_id, "currency": "usd"}
        return (await call("POST", url, headers=bearer(world.api_key), json=body))[:2]

    status, first = await pay()
    assert status == 201 and first["amount"] == 1000, first
    status, out, _ = await call("POST", f"{url}/{first['id']}/paid", headers=bearer(world.api_key))
    assert status == 200 and out["status"] == "paid"
    # refunded in part once its commission was paid: the paid row stands, its clawback waits
    assert (await refund(edge, world.api_key, {"invoiceId": "in_p1", "amount": 4000, "refundId": "p1"}))[0] == 200
    await pg.execute(commissions.APPROVE)
    rows = {r["kind"]: r for r in await pg.fetch("SELECT kind, amount, status, payout_id::text FROM commissions")}
    assert tuple(rows["sale"])[1:] == (1000, "paid", first["id"])
    clawback = -(1000 * 4000 // 10_000)
    assert tuple(rows["clawback"])[1:] == (clawback, "approved", None)
    status, out = await pay()  # the clawback alone: nothing to pay
    assert (status, out["error"]) == (409, "conflict"), out
    await sold(edge, world, drain, invoiceId="in_p2", amount=4000)  # earns as much as was clawed back
    await pg.execute(commissions.APPROVE)
    status, out = await pay()  # summing to nothing: nothing to pay either, and nothing taken
    assert (status, out["error"]) == (409, "conflict"), out
    assert await pg.fetchval("SELECT count(*) FROM commissions WHERE payout_id IS NULL") == 2
    # one more sale: the next payout is the approved rows less the clawback
    await sold(edge, world, drain, invoiceId="in_p3", amount=2500)
    await pg.execute(commissions.APPROVE)
    status, nxt = await pay()
    assert status == 201 and (nxt["amount"], nxt["commissions"]) == (400 + 250 + clawback, 3), nxt
    assert await pg.fetchval("SELECT payout_id::text FROM commissions WHERE kind = 'clawback'") == nxt["id"]
    assert await pg.fetchval("SELECT sum(amount) FROM payouts") == 1000 + 400 + 250 + clawback


# each affiliate's commission per currency net of its clawbacks, as the rules (basis points
# $1, flat $2) and the refunds say, from the sales and refunds rows alone: a sale earns its
# share plus the flat amount, and gives back that times its refunded share, rounded down
EXPECTED_NET = """
SELECT s.affiliate_id::text, s.currency,
       sum(e.earned - e.earned * coalesce(r.total, 0) / s.amount)::bigint AS net
FROM sales s
CROSS JOIN LATERAL (SELECT s.amount * $1::bigint / 10000 + $2::bigint AS earned) e
LEFT JOIN (SELECT sale_id, sum(amount)::bigint AS total FROM refunds GROUP BY 1) r ON r.sale_id = s.event_id
WHERE s.affiliate_id IS NOT NULL
GROUP BY 1, 2 ORDER BY 1, 2
"""
NET = "SELECT affiliate_id::text, currency, sum(amount)::bigint AS net FROM commissions GROUP BY 1, 2 ORDER BY 1, 2"


async def test_each_affiliates_net_commission_is_the_rules_less_the_refunded_shares(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
) -> None:
    assert (await rules(edge, world, sale_bps=1250, sale_flat={"usd": 7, "eur": 7}))[0] == 200
    async with pg.acquire() as conn:  # a second affiliate of the program, with a link of its own
        other = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1, $2, 'second') RETURNING id",
            world.workspace_id,
            world.program_id,
        )
        await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=world.workspace_id,
            code="OTHER",
            url="https://yoursite.com/pricing",
            program_id=world.program_id,
            affiliate_id=str(other),
        )
    theirs = {**CLICK, "affiliate_url": "https://yoursite.com/pricing?aff=OTHER", "session_id": "sess_other"}
    status, click, _ = await call("POST", f"{edge}/api/v1/track/click", json=theirs)
    assert status == 200
    for click_id, customer in ((await new_click(edge), "user_001"), (click["click_id"], "user_002")):
        assert (await lead(edge, world.api_key, lead_body(click_id, customerExternalId=customer)))[0] == 200
    await drain()
    sales = (
        ("in_n1", "user_001", 999, "usd"),
        ("in_n2", "user_001", 4000, "eur"),
        ("in_n3", "user_001", 1001, "usd"),
        ("in_n4", "user_002", 777, "usd"),
        ("in_n5", "user_002", 2000, "usd"),
        ("in_n6", "nobody", 500, "usd"),
    )
    for invoice, customer, amount, currency in sales:
        body = sale_body(invoiceId=invoice, customerExternalId=customer, amount=amount, currency=currency)
        assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    # two partial refunds of one sale (clawed back on their running total, not each rounded),
    # one of another currency, one in full in two steps, one of a sale no affiliate earns on
    for n, (invoice, amount) in enumerate(
        (
            ("in_n1", 333),
            ("in_n1", 333),
            ("in_n2", 1000),
            ("in_n4", 500),
            ("in_n5", 1500),
            ("in_n5", 500),
            ("in_n6", 100),
        )
    ):
        body = {"invoiceId": invoice, "amount": amount, "refundId": f"n{n}"}
        status, out, _ = await refund(edge, world.api_key, body)
        assert status == 200, out
    net = [tuple(r) for r in await pg.fetch(NET)]
    assert net == [tuple(r) for r in await pg.fetch(EXPECTED_NET, 1250, 7)]
    # by hand: 999 earns 131 and gives back 87 (131 * 666 // 999), not 43 + 43; 1001 earns 132;
    # 4000 eur earns 507 and gives back 126; 777 earns 104 and gives back 66; 2000 earns 257, all given back
    assert sorted((a == world.affiliate_id, c, n) for a, c, n in net) == [
        (False, "usd", 104 - 66),
        (True, "eur", 507 - 126),
        (True, "usd", 131 - 87 + 132),
    ]
    # and what each affiliate reads in its stats: its own net, per currency
    for affiliate in (world.affiliate_id, str(other)):
        async with pg.acquire() as conn:
            key = await admin.create_key(
                conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], affiliate_id=affiliate
            )
        status, out, _ = await call("GET", f"{edge}/v1/affiliate/stats", headers=bearer(key["api_key"]))
        assert status == 200 and out["totals"]["commission"] == {c: n for a, c, n in net if a == affiliate}, out


async def test_reconcile_recounts_each_sales_refund_totals_from_its_refunds(
    edge: str, world: World, pg: asyncpg.Pool, drain
) -> None:
    """The running totals on the sale row are what a refund's 409 reads: reconcile holds them
    to the sale's refunds rows, reports drift, and with ``fix`` sets them from the rows."""
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_rc1", amount=5000)
    await sold(edge, world, drain, invoiceId="in_rc2", amount=900, customerExternalId="nobody")  # unattributed
    for n, (invoice, amount) in enumerate((("in_rc1", 1000), ("in_rc1", 500), ("in_rc2", 300))):
        body = {"invoiceId": invoice, "amount": amount, "refundId": f"rc{n}"}
        assert (await refund(edge, world.api_key, body))[0] == 200
    assert await reconcile(pg, fix=False) == []
    # the totals edited by hand (sale_stats stays right: it is recounted from the refunds rows)
    await pg.execute("UPDATE sales SET refunded = 4000, refunds = 1 WHERE invoice_id = 'in_rc1'")
    await pg.execute("UPDATE sales SET refunded = 0, refunds = 0 WHERE invoice_id = 'in_rc2'")
    sale = {r["invoice_id"]: r for r in await pg.fetch("SELECT invoice_id, event_id, received_at FROM sales")}
    one, two = sale["in_rc1"]["event_id"], sale["in_rc2"]["event_id"]
    expected = {
        ("PARTNER123", f"sale.{one}.refunds"): (1, 2),
        ("PARTNER123", f"sale.{one}.refunded"): (4000, 1500),
        ("(unattributed)", f"sale.{two}.refunds"): (0, 1),
        ("(unattributed)", f"sale.{two}.refunded"): (0, 300),
    }
    found = await reconcile(pg, fix=False)
    assert {(d.code, d.counter): (d.stored, d.recomputed) for d in found} == expected
    assert {d.day for d in found} == {s["received_at"].date() for s in sale.values()}  # each sale's day
    # reported, not repaired: the cap still reads the drifted total (1000 left, not 3500)
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_rc1", "amount": 1001, "refundId": "rc8"})
    assert status == 409, out
    assert {(d.code, d.counter): (d.stored, d.recomputed) for d in await reconcile(pg, fix=True)} == expected
    assert await reconcile(pg, fix=False) == []
    totals = {
        r["invoice_id"]: (r["refunded"], r["refunds"])
        for r in await pg.fetch("SELECT invoice_id, refunded, refunds FROM sales")
    }
    assert totals == {"in_rc1": (1500, 2), "in_rc2": (300, 1)}
    # and the cap reads the repaired total: what is left fits, and not a unit more
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_rc1", "amount": 3501, "refundId": "rc9"})
    assert status == 409, out
    status, out, _ = await refund(edge, world.api_key, {"invoiceId": "in_rc1", "amount": 3500, "refundId": "rc9"})
    assert status == 200, out
    assert await reconcile(pg, fix=False) == []
    # refunds rows past their sale (a hand insert): no total its CHECK takes, so reported, left, logged
    await pg.execute(
        "INSERT INTO refunds (id, workspace_id, refund_key, fingerprint, sale_id, invoice_id, amount, currency,"
        " dialect) SELECT $1, workspace_id, 'id:stray', '', event_id, invoice_id, amount, currency, 'native'"
        " FROM sales WHERE invoice_id = 'in_rc2'",
        uuid7(),
    )
    with capture_logs() as logs:
        found = await reconcile(pg, fix=True)
    assert {(d.counter, d.stored, d.recomputed) for d in found} == {
        (f"sale.{two}.refunds", 1, 2),
        (f"sale.{two}.refunded", 300, 300 + 900),
        ("refunds.usd", 1, 2),
        ("refunded.usd", 300, 300 + 900),  # sale_stats: set from the rows, as ever
    }
    assert [e["sales"] for e in logs if e["event"] == "reconcile.refunds_past_their_sale"] == [[str(two)]]
    assert await pg.fetchval("SELECT refunded FROM sales WHERE invoice_id = 'in_rc2'") == 300
