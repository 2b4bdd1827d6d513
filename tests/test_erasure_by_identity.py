"""An erasure redacts the erased subject's own fields and objects, by identity, never by
matching text in other people's data (docs/privacy.md, issue 64's fifth finding).

An affiliate ``1042`` named ``Sam Lee`` is erased: a customer's ``sale.created`` with invoice
``1042`` keeps its invoice, a customer Sam Lee's ``lead.created`` keeps his name, a
milestone keeps its name; the affiliate's own fields (the ``affiliate_email`` of a
self-referral's evidence, the affiliate's row) go. The same for a customer's erasure: the
person's external id ``1042`` becomes its pseudonym where it is theirs (the customer object,
``customer_external_id``, an answer's ``customer_id``), and an invoice of ``1042``, the link,
and the affiliate's fields in their fraud evidence stay as they were, in Postgres and in an
idempotency answer the sweep rewrites."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure as ledger
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import secretbox
from workers.ops import erasure

from ._world import World, call
from .test_erasure import erase_key, found_in, pg_dump_text
from .test_refunds import sold
from .test_seed_004_refport import lead, lead_body, new_click
from .test_webhooks import make_webhook

SAME = "1042"  # the affiliate's external id, an invoice's, a customer's
NAME = "Sam Lee"  # the affiliate's name, and a customer's


def _doc(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def _payloads(pg: asyncpg.Pool) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in await pg.fetch("SELECT event_type, payload FROM webhook_deliveries ORDER BY event_type, created_at, id"):
        out.setdefault(r["event_type"], []).append(_doc(r["payload"]))
    return out


async def _flagged(pg: asyncpg.Pool, hook: str, world: World, event_id: uuid.UUID, evidence: dict[str, Any]) -> None:
    """A self-referral of ``event_id`` as the worker records it (the worker's own, if it
    flagged one, made exactly so): its flag and its delivery."""
    await pg.execute(
        "INSERT INTO event_flags (event_id, rule, workspace_id, excluded, evidence)"
        " VALUES ($1, 'self_referral', $2::uuid, false, $3::text::jsonb)"
        " ON CONFLICT (event_id, rule) DO UPDATE SET evidence = EXCLUDED.evidence",
        event_id,
        world.workspace_id,
        orjson.dumps(evidence).decode(),
    )
    payload = {
        "event_id": str(event_id),
        "type": "lead",
        "received_at": "2026-11-01T00:00:00+00:00",
        "link": {
            "id": world.link["id"],
            "code": world.link["code"],
            "program_id": world.program_id,
            "affiliate_id": world.affiliate_id,
        },
        "excluded": False,
        "flags": [{"rule": "self_referral", "evidence": evidence, "excluded": False}],
    }
    await pg.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, payload)"
        " VALUES ($1::uuid, 'fraud.flagged', $2, $3::text::jsonb) ON CONFLICT (webhook_id, event_type, subject_id,"
        " subject_key) DO UPDATE SET payload = EXCLUDED.payload",
        hook,
        event_id,
        orjson.dumps(payload).decode(),
    )


async def _milestone(pg: asyncpg.Pool, hook: str, world: World) -> dict[str, Any]:
    payload = {
        "affiliate_id": world.affiliate_id,
        "milestone_id": str(uuid.uuid4()),
        "name": "Ten sign-ups",
        "threshold": 10,
        "reached_at": "2026-11-01T00:00:00+00:00",
    }
    await pg.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, subject_key, payload)"
        " VALUES ($1::uuid, 'milestone.reached', $2::uuid, $3, $4::text::jsonb)",
        hook,
        payload["milestone_id"],
        world.affiliate_id,
        orjson.dumps(payload).decode(),
    )
    return payload


async def test_an_affiliates_erasure_redacts_their_own_fields_and_no_one_elses(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """Issue 64's reproduction: the affiliate ``1042``, ``Sam Lee``, is erased; the customer
    Sam Lee's lead and his sale of invoice ``1042`` (the affiliate's own referral) keep their
    payloads, the milestone its name; the affiliate's email in a self-referral's evidence goes."""
    partner_email = f"sam.partner.{secrets.token_hex(3)}@example.com"
    customer_email = f"sam.customer.{secrets.token_hex(3)}@example.com"
    await pg.execute(
        "UPDATE affiliates SET external_id = $2, name = $3, email = $4 WHERE id = $1::uuid",
        world.affiliate_id,
        SAME,
        NAME,
        partner_email,
    )
    hook, _ = await make_webhook(pg, world.workspace_id, "https://hooks.example/h", secretbox.generate_key())
    body = lead_body(await new_click(edge), customerExternalId="cust-sam", customerEmail=customer_email)
    body["customerName"] = NAME
    assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId=SAME, customerExternalId="cust-sam", amount=5000)
    lead_id = await pg.fetchval("SELECT event_id FROM events WHERE type = 2")
    evidence = {"email": customer_email, "affiliate_email": partner_email, "match": "domain"}
    await _flagged(pg, hook, world, lead_id, evidence)
    milestone = await _milestone(pg, hook, world)
    before = await _payloads(pg)
    assert before["sale.created"][0]["invoice_id"] == SAME and before["sale.created"][0]["link"], before
    assert before["lead.created"][0]["customer"]["name"] == NAME, before

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/affiliates/{world.affiliate_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out

    after = await _payloads(pg)
    assert after["sale.created"] == before["sale.created"]  # invoice 1042 is the sale's
    assert after["lead.created"] == before["lead.created"]  # Sam Lee the customer is someone else
    assert after["milestone.reached"] == [milestone]  # the milestone's name is the milestone's
    (flag,) = after["fraud.flagged"]
    assert flag["flags"][0]["evidence"] == {**evidence, "affiliate_email": None}, flag
    assert flag["link"] == before["fraud.flagged"][0]["link"]
    (kept,) = await pg.fetch("SELECT evidence FROM event_flags")
    assert _doc(kept["evidence"]) == {**evidence, "affiliate_email": None}
    row = await pg.fetchrow("SELECT external_id, name, email FROM affiliates WHERE id = $1::uuid", world.affiliate_id)
    assert ledger.is_pseudonym(row["external_id"]) and row["name"] is None and row["email"] is None
    assert not found_in([("postgres", pg_dump_text(settings.database_url))], {"email": partner_email.encode()})


async def test_a_customers_erasure_redacts_their_own_fields_and_no_one_elses(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """The customer ``1042`` (a self-referral: the affiliate's email is theirs too) buys
    through Refport, and twice through Affixo under an Idempotency-Key, once under invoice
    ``1042``, and is erased: their external id is a pseudonym where it is theirs, the
    invoice and the affiliate's fields are as they were, in the outbox, the fraud evidence
    and the rewritten answer."""
    from .test_commissions import rules

    email = f"sam.{secrets.token_hex(3)}@example.com"
    await pg.execute("UPDATE affiliates SET email = $2 WHERE id = $1::uuid", world.affiliate_id, email)
    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    hook, _ = await make_webhook(pg, world.workspace_id, "https://hooks.example/h", secretbox.generate_key())
    body = lead_body(await new_click(edge), customerExternalId=SAME, customerEmail=email, customerName=NAME)
    assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in-9", customerExternalId=SAME, amount=5000)
    conversion = {"customer_id": SAME, "amount": 700, "invoice_id": "1043", "metadata": {"coupon": SAME}}
    headers = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "conv-1042"}
    status, answered, _ = await call("POST", f"{edge}/v1/track/conversion", json=conversion, headers=headers)
    assert status == 200 and answered["customer_id"] == SAME, answered
    conversion2 = {"customer_id": SAME, "amount": 800, "invoice_id": SAME}
    headers2 = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "conv-1042-b"}
    status, answered2, _ = await call("POST", f"{edge}/v1/track/conversion", json=conversion2, headers=headers2)
    assert status == 200 and answered2["invoice_id"] == SAME, answered2
    await drain()
    lead_id = await pg.fetchval("SELECT event_id FROM events WHERE type = 2")
    evidence = {"email": email, "affiliate_email": email, "match": "email"}
    await _flagged(pg, hook, world, lead_id, evidence)
    before = await _payloads(pg)

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call("DELETE", f"{edge}/v1/customers/{SAME}", headers={"Authorization": f"Bearer {eraser}"})
    assert status == 202, out
    async with pg.acquire() as conn:
        alias = ledger.pseudonym(await ledger.salt(conn), ledger.EXTERNAL, SAME, world.workspace_id)

    after = await _payloads(pg)
    sales = {p["invoice_id"]: p for p in after["sale.created"]}
    assert set(sales) == {"in-9", SAME, "1043"}, after["sale.created"]  # the invoices are the sales'
    for invoice, p in sales.items():
        assert p["customer"] == {"external_id": alias}, p
        was = next(b for b in before["sale.created"] if b["invoice_id"] == invoice)
        assert {**p, "customer": was["customer"]} == was  # nothing else of the sale changed
    (made,) = after["lead.created"]
    assert made["customer"] == {"external_id": alias, "email": None, "name": None}, made
    assert made["link"] == before["lead.created"][0]["link"]
    assert {p["customer_external_id"] for p in after["commission.created"]} == {alias}
    (flag,) = after["fraud.flagged"]
    assert flag["flags"][0]["evidence"] == {"email": None, "affiliate_email": email, "match": "email"}, flag

    await erasure.sweep(pg, redis, keys, None)
    status, again, replayed = await call("POST", f"{edge}/v1/track/conversion", json=conversion, headers=headers)
    assert status == 200 and replayed.get("Idempotent-Replayed") == "true", (status, again)
    assert again == {**answered, "customer_id": alias}, again  # its invoice 1043 and amount kept
    status, again2, _ = await call("POST", f"{edge}/v1/track/conversion", json=conversion2, headers=headers2)
    assert again2 == {**answered2, "customer_id": alias}, again2  # invoice 1042 is the sale's
