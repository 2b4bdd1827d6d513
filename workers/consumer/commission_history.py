"""A customer's commissions looked up in their history (``workers.consumer.commissions``
asks, per customer in key order, under the customers' advisory locks): the first sale of a
``first_sale`` program's customer (``first_sale``), the first lead of a lead group
(``first_lead``), and a ``months`` program's sales a new first lead put past the span
(``months_past``); each the ``commissions`` rows (``row``) it earns or takes back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract.commission import Rules

# a first_sale customer's attributed sales of more than nothing in the program, oldest first
# (a free trial's sale of 0 is no first purchase), and whether first_sale granted one a
# commission that still stands
_FIRSTS = """
SELECT s.event_id, s.received_at, s.amount, s.currency, s.link_id, s.affiliate_id, s.dialect,
       EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'sale' AND c.rule = 'first_sale'
                                             AND c.source_id = s.event_id)
       AND NOT EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'reversal' AND c.source_id = s.event_id) AS earning,
       (SELECT sum(c.amount) FROM commissions c
        WHERE (c.kind = 'sale' AND c.source_id = s.event_id) OR (c.kind = 'clawback' AND c.sale_id = s.event_id))
           AS earned,  -- what still stands of it: its refunds' clawbacks took the rest
       (SELECT c.currency FROM commissions c WHERE c.kind = 'sale' AND c.source_id = s.event_id)
           AS earned_currency  -- the commission's own: what a reversal takes back is in it
FROM sales s
WHERE s.workspace_id = $1 AND s.customer_external_id = $2 AND s.program_id = $3 AND s.unattributed IS NULL
  AND s.amount > 0
ORDER BY s.received_at, s.event_id
"""
# a customer's counted leads in a program, oldest first, and what each one's lead commission
# still stands at (None: it has none, or it was taken back)
_LEADS_OF = """
SELECT e.event_id, e.received_at, e.name, e.dialect, e.link_id, e.affiliate_id,
       (SELECT sum(c.amount) FROM commissions c WHERE c.source_id = e.event_id AND c.kind IN ('lead', 'reversal')
        HAVING bool_and(c.kind = 'lead')) AS earning,
       (SELECT c.currency FROM commissions c WHERE c.source_id = e.event_id AND c.kind = 'lead')
           AS earned_currency  -- the lead commission's own, whatever lead_currency says today
FROM customer_leads e
WHERE e.workspace_id = $1 AND e.customer_external_id = $2 AND e.program_id = $3 AND e.affiliate_id IS NOT NULL
ORDER BY e.received_at, e.event_id
"""
# a months customer's sales that months made earn, not taken back, received past the span
# ($4 days) from the customer's first counted lead in the program; what each still stands at
_MONTHS_PAST = """
WITH first AS (
    SELECT min(e.received_at) AS at FROM customer_leads e
    WHERE e.workspace_id = $1 AND e.customer_external_id = $2 AND e.program_id = $3 AND e.affiliate_id IS NOT NULL
)
SELECT s.event_id, s.received_at, s.currency, s.link_id, s.affiliate_id,
       (SELECT sum(c.amount) FROM commissions c
        WHERE (c.kind = 'sale' AND c.source_id = s.event_id) OR (c.kind = 'clawback' AND c.sale_id = s.event_id))
           AS earned,
       (SELECT c.currency FROM commissions c WHERE c.kind = 'sale' AND c.source_id = s.event_id) AS earned_currency
FROM sales s, first
WHERE s.workspace_id = $1 AND s.customer_external_id = $2 AND s.program_id = $3 AND s.unattributed IS NULL
  AND s.received_at - first.at > make_interval(days => $4)
  AND EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'sale' AND c.rule = 'months' AND c.source_id = s.event_id)
  AND NOT EXISTS (SELECT 1 FROM commissions c WHERE c.kind = 'reversal' AND c.source_id = s.event_id)
ORDER BY s.event_id
"""


def row(
    ws: str,
    program: Any,
    affiliate: Any,
    link: Any,
    kind: str,
    source: UUID,
    customer: str | None,
    amount: int,
    currency: str,
    at: datetime,
    rules: Rules,
    rule: str | None = None,
) -> tuple[Any, ...]:
    rule = rule or ("lead" if kind == "lead" else rules.duration)
    return (ws, program, affiliate, link, kind, source, customer, amount, currency, at, rules.approve_after(at), rule)


async def first_lead(
    conn: asyncpg.Connection,
    ws: str,
    customer: str,
    program: str,
    group: str,
    r: Rules,
    batch: set[UUID],
    earns: Callable[[str], bool],
) -> list[tuple[Any, ...]]:
    """The customer's first counted lead of the group earns ``lead_flat``, when it is one
    this batch counts; any later one of the group that had earned is taken back, in the
    currency it earned in (rules may have changed since: never today's ``lead_currency``)."""
    leads = await conn.fetch(_LEADS_OF, UUID(ws), customer, UUID(program))
    found = [x for x in leads if r.lead_group(x["name"]) == group]
    if not found:
        return []
    first, out = found[0], []
    if first["event_id"] in batch and first["earning"] is None and r.lead_flat > 0 and earns(first["dialect"]):
        out.append(
            row(
                ws,
                program,
                first["affiliate_id"],
                first["link_id"],
                "lead",
                first["event_id"],
                customer,
                r.lead_flat,
                r.lead_currency,
                first["received_at"],
                r,
            )
        )
    for later in found[1:]:
        if later["earning"]:
            out.append(
                row(
                    ws,
                    program,
                    later["affiliate_id"],
                    later["link_id"],
                    "reversal",
                    later["event_id"],
                    customer,
                    -later["earning"],
                    later["earned_currency"],  # the lead commission's, not today's lead_currency
                    later["received_at"],
                    r,
                    "lead",
                )
            )
    return out


async def months_past(
    conn: asyncpg.Connection, ws: str, customer: str, program: str, r: Rules
) -> list[tuple[Any, ...]]:
    """A lead stored after the customer's sales that is older than the lead they were timed
    from moves ``months``' start earlier: a sale ``months`` made earn that is now past the
    span is taken back (what it still stands at). What other rules granted stands."""
    found = await conn.fetch(_MONTHS_PAST, UUID(ws), customer, UUID(program), 30 * r.duration_months)
    return [
        row(
            ws,
            program,
            x["affiliate_id"],
            x["link_id"],
            "reversal",
            x["event_id"],
            customer,
            -x["earned"],
            x["earned_currency"] or x["currency"],
            x["received_at"],
            r,
        )
        for x in found
        if x["earned"]
    ]


async def first_sale(
    conn: asyncpg.Connection,
    ws: str,
    customer: str,
    program: str,
    r: Rules,
    new: set[UUID],
    earns: Callable[[str], bool],
) -> list[tuple[Any, ...]]:
    """The customer's first attributed sale earns, when it is one this batch stores or
    attributes (a sale stored before these rules earns nothing after the fact); any later
    one that first_sale made earn is taken back (what other rules granted stands)."""
    found = await conn.fetch(_FIRSTS, UUID(ws), customer, UUID(program))
    if not found:
        return []
    first, out = found[0], []
    earned = r.for_sale(first["amount"], first["currency"])
    if first["event_id"] in new and not first["earning"] and earned > 0 and earns(first["dialect"]):
        out.append(
            row(
                ws,
                program,
                first["affiliate_id"],
                first["link_id"],
                "sale",
                first["event_id"],
                customer,
                earned,
                first["currency"],
                first["received_at"],
                r,
            )
        )
    for later in found[1:]:
        if later["earning"]:
            out.append(
                row(
                    ws,
                    program,
                    later["affiliate_id"],
                    later["link_id"],
                    "reversal",
                    later["event_id"],
                    customer,
                    -(later["earned"] or 0),
                    later["earned_currency"] or later["currency"],
                    later["received_at"],
                    r,
                )
            )
    return out
