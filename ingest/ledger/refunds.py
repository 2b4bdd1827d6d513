"""Refunds: a sale's money given back, recorded as rows of their own and never as an edit.

A refund names its sale by the invoice (``invoiceId``) and takes a full or partial amount
(none: what is left of the sale). It is written at once, in one Postgres transaction, since
its answer depends on what was refunded before: under the sale's row lock (and the
customer's advisory lock the workers take for the customer's sales), so the refunded total
can never pass the sale's amount (``RefundTooLarge``, the route's 409), whatever number of
refunds of one sale arrive at once through any number of edges.

Idempotent on its key: the client's ``refundId``, else its ``Idempotency-Key``; one of them
is required, since a refund that cannot be told from its retry could be paid back twice.
A repeat with the same key gets the first refund's answer (``Replayed``), a repeat that asks
something else ``KeyReused`` (422), for ever (``refunds``' unique key, not a window).

In the same transaction: the sale's running totals, ``sale_stats``' refunds of the sale's
link, day and currency, the clawbacks (``clawbacks``) and the webhooks (``refund.created``,
and ``commission.created`` for each clawback). A sale whose commission is written after a
refund (attributed late) gets its clawbacks then, from the workers (``clawbacks`` again).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract.connections import write
from ingest.contract.errors import NotFound, Refused
from ingest.contract.events import uuid7
from ingest.ledger import outbox
from ingest.ledger.outbox import WebhookEvent

NIL = UUID(int=0)  # sale_stats' link of the unattributed

_SALE = "SELECT event_id, customer_external_id FROM sales WHERE workspace_id = $1 AND invoice_id = $2"
_LOCK = """
SELECT event_id, amount, currency, refunded, link_id, received_at FROM sales WHERE event_id = $1 FOR UPDATE
"""
_FIRST = """
SELECT id, sale_id, invoice_id, amount, currency, reason, fingerprint, created_at
FROM refunds WHERE workspace_id = $1 AND refund_key = $2
"""
_INSERT = """
INSERT INTO refunds (id, workspace_id, refund_key, fingerprint, sale_id, invoice_id, amount, currency, reason, dialect,
                     created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, coalesce($11, now()))
RETURNING id, sale_id, invoice_id, amount, currency, reason, fingerprint, created_at
"""
_MOVE = "UPDATE sales SET refunded = refunded + $2, refunds = refunds + 1 WHERE event_id = $1 RETURNING refunded"
_STATS = """
INSERT INTO sale_stats AS t (workspace_id, link_id, day, currency, refunds, refunded) VALUES ($1, $2, $3, $4, 1, $5)
ON CONFLICT (workspace_id, link_id, day, currency)
DO UPDATE SET refunds = t.refunds + 1, refunded = t.refunded + EXCLUDED.refunded
"""


class SaleNotFound(NotFound):
    """No sale of that invoice in the workspace (yet: a sale still on its way is not)."""


class RefundTooLarge(Refused, ValueError):
    """The refund would take the sale's refunded total past its amount (or refunds nothing)."""

    def __init__(self, amount: int, refunded: int, left: int) -> None:
        super().__init__(f"the sale's refundable amount left is {left} (amount {amount}, refunded {refunded})")
        self.left = left


class KeyReused(Refused, ValueError):
    """The refund's key names a refund that asked something else."""


@dataclass(frozen=True, slots=True)
class Asked:
    """A refund request: its key (``refund_key``), the invoice, the amount (None: what is
    left), a reason, and the dialect it came through."""

    workspace_id: str
    key: str
    invoice_id: str
    amount: int | None
    reason: str | None
    dialect: str
    asked_as: str | None = None  # a restored copy's: what its first request asked (``fingerprint``)

    @classmethod
    def keyed(cls, workspace_id: str, refund_id: str | None, idem_key: str | None, **kw: Any) -> Asked:
        """The refund's key: its ``refundId``, else its ``Idempotency-Key`` digested (never stored as sent)."""
        if refund_id is not None:
            key = "id:" + refund_id
        elif idem_key is not None:
            key = "idem:" + hashlib.sha256(idem_key.encode()).hexdigest()[:32]
        else:
            raise ValueError("a refund needs a refundId or an Idempotency-Key")
        return cls(workspace_id, key, **kw)

    @property
    def fingerprint(self) -> str:
        if self.asked_as is not None:
            return self.asked_as
        raw = f"{self.invoice_id}\x00{'' if self.amount is None else self.amount}\x00{self.reason or ''}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Refunded:
    """A refund as stored, and whether this request made it (False: a repeat's answer)."""

    row: dict[str, Any]
    made: bool


async def record(
    conn: asyncpg.Connection,
    asked: Asked,
    *,
    refund_id: UUID | None = None,
    at: datetime | None = None,
    notify: bool = True,
) -> Refunded:
    """Record the refund ``asked`` for (one transaction; raises ``SaleNotFound``,
    ``RefundTooLarge``, ``KeyReused``, and what Postgres raised: ``OutcomeUnknown``
    (``COMMIT``) when the commit's outcome is unknown, and a retry with the same key is
    safe). ``refund_id`` and ``at``: a stream copy's, restored as the edge first recorded it
    (else minted now).
    ``notify`` off: an import's, no webhook. The clawback is never optional: a sale with a
    commission gives back its refunded share, whoever records the refund."""
    ws = UUID(asked.workspace_id)
    first = await conn.fetchrow(_FIRST, ws, asked.key)
    if first is not None:
        return _repeat(first, asked)
    sale = await conn.fetchrow(_SALE, ws, asked.invoice_id)
    if sale is None:
        raise SaleNotFound(f"no sale of invoice {asked.invoice_id!r}")
    try:
        return await _record(conn, asked, ws, sale, refund_id or uuid7(), at, notify)
    except asyncpg.UniqueViolationError:  # its key, recorded meanwhile for another sale's refund
        first = await conn.fetchrow(_FIRST, ws, asked.key)
        if first is None:
            raise
        return _repeat(first, asked)


async def _record(
    conn: asyncpg.Connection,
    asked: Asked,
    ws: UUID,
    sale: asyncpg.Record,
    refund_id: UUID,
    at: datetime | None,
    notify: bool = True,
) -> Refunded:
    async with write(conn):
        await lock_customers(conn, [(asked.workspace_id, sale["customer_external_id"])])
        first = await conn.fetchrow(_FIRST, ws, asked.key)  # under the locks: a copy at the same moment
        if first is not None:
            return _repeat(first, asked)
        locked = await conn.fetchrow(_LOCK, sale["event_id"])
        left = locked["amount"] - locked["refunded"]
        amount = left if asked.amount is None else asked.amount
        if amount <= 0 or amount > left:
            raise RefundTooLarge(locked["amount"], locked["refunded"], left)
        sale_id, currency = locked["event_id"], locked["currency"]
        row = await conn.fetchrow(
            _INSERT,
            refund_id,
            ws,
            asked.key,
            asked.fingerprint,
            sale_id,
            asked.invoice_id,
            amount,
            currency,
            asked.reason,
            asked.dialect,
            at,
        )
        await conn.execute(_MOVE, locked["event_id"], amount)
        day = locked["received_at"].date()
        await conn.execute(_STATS, ws, locked["link_id"] or NIL, day, locked["currency"], amount)
        notices = [WebhookEvent(asked.workspace_id, "refund.created", row["id"], "", answer(row))]
        notices += await clawbacks(conn, [locked["event_id"]])
        if notify:
            await outbox.record_deliveries(conn, notices)
    return Refunded(answer(row), True)


def _repeat(first: asyncpg.Record, asked: Asked) -> Refunded:
    if first["fingerprint"] != asked.fingerprint:
        raise KeyReused("this refund id (or Idempotency-Key) was used for another refund")
    return Refunded(answer(first), False)


def answer(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "refund_id": str(row["id"]),
        "sale_event_id": str(row["sale_id"]),
        "invoice_id": row["invoice_id"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reason": row["reason"],
        "created_at": row["created_at"].isoformat(),
    }


async def lock_customers(conn: asyncpg.Connection, customers: Sequence[tuple[str, str]]) -> None:
    """One advisory lock per (workspace, customer), for this transaction, in key order: what
    the workers hold while they attribute a customer's sales and write their commissions."""
    keys = sorted(
        {int.from_bytes(hashlib.sha256(f"{w}\x1f{c}".encode()).digest()[:8], "big", signed=True) for w, c in customers}
    )
    if keys:
        await conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k", keys)


# the sales' commissions (a sale's, and whether first_sale took it back), what their
# clawbacks took so far, and their refunds in order with whether each has its clawback
_EARNED = """
SELECT s.event_id, s.amount AS sale_amount, c.workspace_id, c.program_id, c.affiliate_id, c.link_id,
       c.customer_external_id, c.amount AS earned, c.currency, c.approve_after,
       EXISTS (SELECT 1 FROM commissions r WHERE r.kind = 'reversal' AND r.source_id = s.event_id) AS reversed,
       coalesce((SELECT -sum(k.amount) FROM commissions k WHERE k.kind = 'clawback' AND k.sale_id = s.event_id), 0)
           AS clawed
FROM sales s JOIN commissions c ON c.kind = 'sale' AND c.source_id = s.event_id
WHERE s.event_id = ANY($1::uuid[])
ORDER BY s.event_id
"""
_REFUNDS = """
SELECT r.id, r.sale_id, r.amount, r.created_at,
       EXISTS (SELECT 1 FROM commissions k WHERE k.kind = 'clawback' AND k.source_id = r.id) AS clawed
FROM refunds r WHERE r.sale_id = ANY($1::uuid[]) ORDER BY r.sale_id, r.seq
"""
_CLAW = """
INSERT INTO commissions (workspace_id, program_id, affiliate_id, link_id, kind, rule, source_id, sale_id,
                         customer_external_id, amount, currency, earned_at, approve_after)
SELECT x.workspace_id, x.program_id, x.affiliate_id, x.link_id, 'clawback', 'refund', x.source_id, x.sale_id,
       x.customer, x.amount, x.currency, x.earned_at, greatest(x.approve_after, now())
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[], $7::text[], $8::bigint[],
            $9::text[], $10::timestamptz[], $11::timestamptz[])
     AS x(workspace_id, program_id, affiliate_id, link_id, source_id, sale_id, customer, amount, currency,
          earned_at, approve_after)
ORDER BY x.source_id
ON CONFLICT (kind, source_id) DO NOTHING
RETURNING id, workspace_id, program_id, affiliate_id, link_id, kind, source_id, customer_external_id, amount,
          currency, earned_at
"""


async def clawbacks(conn: asyncpg.Connection, sale_ids: Sequence[UUID]) -> list[WebhookEvent]:
    """The clawbacks the sales' refunds call for and do not have yet, one per refund: what
    brings the sale's clawed total to its commission times its refunded share, rounded down
    (all of it once the sale is refunded in full); nothing for a commission ``first_sale``
    took back. Run where a refund is recorded, and where a refunded sale earns (late)."""
    earned = {r["event_id"]: r for r in await conn.fetch(_EARNED, list(sale_ids))}
    if not earned:
        return []
    rows: list[tuple[Any, ...]] = []
    running: dict[UUID, int] = {}
    clawed = {sale: e["clawed"] for sale, e in earned.items()}
    for refund in await conn.fetch(_REFUNDS, list(earned)):
        e = earned[refund["sale_id"]]
        total = running[refund["sale_id"]] = running.get(refund["sale_id"], 0) + refund["amount"]
        if refund["clawed"] or e["reversed"] or e["earned"] <= 0:
            continue
        take = e["earned"] * total // e["sale_amount"] - clawed[refund["sale_id"]]
        if take <= 0:
            continue
        clawed[refund["sale_id"]] += take
        rows.append(
            (
                e["workspace_id"],
                e["program_id"],
                e["affiliate_id"],
                e["link_id"],
                refund["id"],
                refund["sale_id"],
                e["customer_external_id"],
                -take,
                e["currency"],
                refund["created_at"],
                e["approve_after"],
            )
        )
    if not rows:
        return []
    done = await conn.fetch(_CLAW, *(list(col) for col in zip(*rows, strict=True)))
    return [commission_notice(r) for r in done]


def commission_notice(r: asyncpg.Record) -> WebhookEvent:
    """``commission.created`` for a ledger row, as the workers' and a refund's are sent."""
    data = {
        "id": str(r["id"]),
        "kind": r["kind"],
        "source_event_id": str(r["source_id"]),
        "program_id": str(r["program_id"]),
        "affiliate_id": str(r["affiliate_id"]),
        "link_id": str(r["link_id"]) if r["link_id"] else None,
        "customer_external_id": r["customer_external_id"],
        "amount": r["amount"],
        "currency": r["currency"],
        "earned_at": _iso(r["earned_at"]),
        "status": "pending",
    }
    return WebhookEvent(str(r["workspace_id"]), "commission.created", r["id"], "", data)


def _iso(at: datetime) -> str:
    return at.isoformat()
