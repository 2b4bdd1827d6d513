"""The commission ledger: what each counted sale or lead earns its affiliate, by its
program's rules (``ingest.contract.commission``), in the transaction that counts it.

- A sale earns when it is attributed (on insert, or when its lead is stored after it) to
  an affiliate of a program with rules, and its duration says so: ``lifetime``; ``months``
  within the rules' span of its lead; ``first_sale``, the customer's first attributed sale
  in the program by received time, whatever order the workers store them in: a sale stored
  after a later one that had earned makes that one's commission taken back (a ``reversal``
  row), and earns instead.
- A counted lead earns the program's ``lead_flat``, in ``lead_currency``.

Exactly once: a row per (kind, source event), ``ON CONFLICT DO NOTHING``; a redelivery,
a replay or a second lead of one customer and name (not counted) earns nothing more. The
rules are those in force when the sale or lead is stored. Runs under the customers'
advisory locks (``workers.consumer.sales``), so a customer's sales are settled one batch at
a time; writes ``commissions`` in (kind, source) order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows
from ingest.contract.commission import Rules
from ingest.contract.events import EventType
from ingest.manage import refunds
from ingest.manage.outbox import WebhookEvent
from ingest.manage.refunds import commission_notice
from workers.consumer.stored import Stored

_RULES = "SELECT id, commission FROM programs WHERE id = ANY($1::uuid[])"

_COLUMNS = (
    ("workspace_id", "uuid"), ("program_id", "uuid"), ("affiliate_id", "uuid"), ("link_id", "uuid"),
    ("kind", "text"), ("source_id", "uuid"), ("customer_external_id", "text"), ("amount", "bigint"),
    ("currency", "text"), ("earned_at", "timestamptz"), ("approve_after", "timestamptz"), ("rule", "text"),
)  # fmt: skip
_INSERT = f"""
INSERT INTO commissions ({", ".join(n for n, _ in _COLUMNS)})
{jsonrows.select([t for _, t in _COLUMNS])}
ORDER BY 5, 6
ON CONFLICT (kind, source_id) DO NOTHING
RETURNING id, workspace_id, program_id, affiliate_id, link_id, kind, source_id, customer_external_id, amount,
          currency, earned_at
"""
# a first_sale customer's attributed sales in the program, oldest first, and whether first_sale
# granted one a commission that still stands
_FIRSTS = """
SELECT s.event_id, s.received_at, s.amount, s.currency, s.link_id, s.affiliate_id,
       EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'sale' AND c.rule = 'first_sale'
                                             AND c.source_id = s.event_id)
       AND NOT EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'reversal' AND c.source_id = s.event_id) AS earning,
       (SELECT sum(c.amount) FROM commissions c
        WHERE (c.kind = 'sale' AND c.source_id = s.event_id) OR (c.kind = 'clawback' AND c.sale_id = s.event_id))
           AS earned  -- what still stands of it: its refunds' clawbacks took the rest
FROM sales s
WHERE s.workspace_id = $1 AND s.customer_external_id = $2 AND s.program_id = $3 AND s.unattributed IS NULL
ORDER BY s.received_at, s.event_id
"""
APPROVE = "UPDATE commissions SET status = 'approved' WHERE status = 'pending' AND approve_after <= now()"


@dataclass(frozen=True, slots=True)
class Sold:
    """An attributed sale, as the ledger needs it."""

    event_id: UUID
    workspace_id: str
    customer: str
    program_id: UUID | None
    affiliate_id: UUID | None
    link_id: UUID | None
    amount: int
    currency: str
    at: datetime
    lead_at: datetime


def _row(ws: str, program: Any, affiliate: Any, link: Any, kind: str, source: UUID, customer: str | None,
         amount: int, currency: str, at: datetime, rules: Rules) -> tuple[Any, ...]:  # fmt: skip
    rule = "lead" if kind == "lead" else rules.duration
    return (ws, program, affiliate, link, kind, source, customer, amount, currency, at, rules.approve_after(at), rule)


async def settle(conn: asyncpg.Connection, sold: list[Sold], leads: list[Stored]) -> list[WebhookEvent]:
    """The ledger rows the batch's newly attributed sales and counted leads earn (and the
    reversals ``first_sale`` calls for); a ``commission.created`` notice for each new row."""
    sold = [s for s in sold if s.program_id is not None and s.affiliate_id is not None]
    leads = [s for s in leads if s.type is EventType.LEAD and s.link.program_id and s.link.affiliate_id]
    programs = sorted({str(s.program_id) for s in sold} | {str(s.link.program_id) for s in leads})
    if not programs:
        return []
    rules = {str(r["id"]): Rules.from_json(r["commission"]) for r in await conn.fetch(_RULES, programs)}
    rows: list[tuple[Any, ...]] = []
    for lead in leads:
        r = rules.get(str(lead.link.program_id), Rules())
        if r.lead_flat > 0:
            link = lead.link
            rows.append(_row(link.workspace_id, link.program_id, link.affiliate_id, link.id, "lead",
                             lead.envelope.event_id, lead.text("external_id"), r.lead_flat, r.lead_currency,
                             lead.at, r))  # fmt: skip
    firsts: dict[tuple[str, str, str], Rules] = {}
    for sale in sold:
        r = rules.get(str(sale.program_id), Rules())
        if r.duration == "first_sale":
            firsts[(sale.workspace_id, sale.customer, str(sale.program_id))] = r
        elif r.for_sale(sale.amount) > 0 and r.within(sale.at, sale.lead_at):
            rows.append(_row(sale.workspace_id, sale.program_id, sale.affiliate_id, sale.link_id, "sale",
                             sale.event_id, sale.customer, r.for_sale(sale.amount), sale.currency, sale.at,
                             r))  # fmt: skip
    new = {sale.event_id for sale in sold}
    for (ws, customer, program), r in sorted(firsts.items()):
        rows += await _first_sale(conn, ws, customer, program, r, new)
    if not rows:
        return []
    made = await conn.fetch(_INSERT, jsonrows.doc(rows))
    notices = [commission_notice(r) for r in made]
    # a sale refunded before it earned (attributed late): its refunds' clawbacks now
    if earning := sorted(r["source_id"] for r in made if r["kind"] == "sale"):
        notices += await refunds.clawbacks(conn, earning)
    return notices


async def _first_sale(
    conn: asyncpg.Connection, ws: str, customer: str, program: str, r: Rules, new: set[UUID]
) -> list[tuple[Any, ...]]:
    """The customer's first attributed sale earns, when it is one this batch stores or
    attributes (a sale stored before these rules earns nothing after the fact); any later
    one that first_sale made earn is taken back (what other rules granted stands)."""
    found = await conn.fetch(_FIRSTS, UUID(ws), customer, UUID(program))
    if not found:
        return []
    first, out = found[0], []
    if first["event_id"] in new and not first["earning"] and r.for_sale(first["amount"]) > 0:
        out.append(_row(ws, program, first["affiliate_id"], first["link_id"], "sale", first["event_id"], customer,
                        r.for_sale(first["amount"]), first["currency"], first["received_at"], r))  # fmt: skip
    for later in found[1:]:
        if later["earning"]:
            out.append(_row(ws, program, later["affiliate_id"], later["link_id"], "reversal", later["event_id"],
                            customer, -(later["earned"] or 0), later["currency"], later["received_at"], r))  # fmt: skip
    return out
