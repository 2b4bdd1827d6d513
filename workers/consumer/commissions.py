"""The commission ledger: what each counted sale or lead earns its affiliate, by its
program's rules (``ingest.contract.commission``), in the transaction that counts it.

- A sale earns when it is attributed (on insert, or when its lead is stored after it) to
  an affiliate of a program with rules, and its duration says so: ``lifetime``, for ever;
  ``months``, within the rules' span of the customer's FIRST counted lead in the program
  (a lead stored after a sale that earned, and older than the lead it was timed from,
  takes it back by a ``reversal`` where it is now past the span);
  ``first_sale``, the customer's first attributed sale in the program by received time
  (a sale of 0 is none), whatever order the workers store them in: a sale stored after a
  later one that had earned makes that one's commission taken back (a ``reversal`` row),
  and earns instead.
  Its flat part is the rules' ``sale_flat`` in the sale's currency, none in a currency
  the rules have no flat amount for.
- A customer's leads earn the program's ``lead_flat`` (in ``lead_currency``) once: the
  customer's first counted lead in the program earns it (``lead_events`` set: the first of
  each named event), by received time, whatever order they are stored in: a lead stored
  after a later one that had earned takes that one's back, and earns instead (what its
  own rules pay: nothing, where they pay no ``lead_flat``, and the later one's is taken
  back all the same).
- History imported without ``--commissions`` (rows of the ``import`` dialect) earns
  nothing, and is history all the same: an imported lead is the customer's first lead, an
  imported sale its first sale. A live sale that an imported lead attributes earns.

``ingest.contract.earnings`` is the same rules as a pure function of the whole history,
which ``refstream reconcile`` and the tests compare the ledger with.

Exactly once: a row per (kind, source event), ``ON CONFLICT DO NOTHING``; a redelivery,
a replay or a second lead of one customer and name (not counted) earns nothing more. The
rules are those in force when the sale or lead is stored (a sale's: when it is attributed).
A row that takes another back is in THAT row's currency, whatever the rules say now: a
reversal in its commission's (``earned_currency``), as a clawback (``ingest.ledger.refunds``)
in its sale commission's. Runs under the customers'
advisory locks (``workers.consumer.sales``), so a customer's sales and leads are settled
one batch at a time; writes ``commissions`` in (kind, source) order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows, plans
from ingest.contract.commission import Rules
from ingest.contract.earnings import IMPORT_DIALECT
from ingest.contract.events import EventType
from ingest.ledger import refunds
from ingest.ledger.outbox import WebhookEvent
from ingest.ledger.refunds import commission_notice
from workers.consumer.stored import Stored

_RULES = f"SELECT id, commission FROM programs WHERE id = {plans.any_of(1, 'uuid')}"  # ingest.contract.plans

_COLUMNS = (
    ("workspace_id", "uuid"),
    ("program_id", "uuid"),
    ("affiliate_id", "uuid"),
    ("link_id", "uuid"),
    ("kind", "text"),
    ("source_id", "uuid"),
    ("customer_external_id", "text"),
    ("amount", "bigint"),
    ("currency", "text"),
    ("earned_at", "timestamptz"),
    ("approve_after", "timestamptz"),
    ("rule", "text"),
)
_INSERT = f"""
INSERT INTO commissions ({", ".join(n for n, _ in _COLUMNS)})
{jsonrows.select([t for _, t in _COLUMNS])}
ORDER BY 5, 6
ON CONFLICT (kind, source_id) DO NOTHING
RETURNING id, workspace_id, program_id, affiliate_id, link_id, kind, source_id, customer_external_id, amount,
          currency, earned_at
"""
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
# the customers' first counted lead in each program (``months`` counts from it)
_FIRST_LEADS = f"""
SELECT x.i, (SELECT min(e.received_at) FROM customer_leads e
             WHERE e.workspace_id = x.workspace_id AND e.customer_external_id = x.customer
               AND e.program_id = x.program_id AND e.affiliate_id IS NOT NULL) AS first_at
FROM {jsonrows.table(("int", "uuid", "text", "uuid"), "x(i, workspace_id, customer, program_id)")}
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
    dialect: str


def _row(
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


@dataclass(slots=True, eq=False)
class _Earning:
    """One batch's commissions as ``settle``'s steps find them: the programs' rules, the
    rows to write, and what is to be looked up per customer (each in key order)."""

    conn: asyncpg.Connection
    import_earns: bool
    rules: dict[str, Rules] = field(default_factory=dict)
    # programs that were ever given rules: a lead_flat may have been paid under earlier ones
    ruled: set[str] = field(default_factory=set)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    # (workspace, customer, program, lead group)
    groups: dict[tuple[str, str, str, str], Rules] = field(default_factory=dict)
    # a months program's customers whose first lead may be new
    timed: dict[tuple[str, str, str], Rules] = field(default_factory=dict)
    firsts: dict[tuple[str, str, str], Rules] = field(default_factory=dict)  # a first_sale program's customers
    months: list[tuple[Sold, Rules]] = field(default_factory=list)  # sales that earn unless past their span

    def earns(self, dialect: str) -> bool:
        return dialect != IMPORT_DIALECT or self.import_earns

    def rules_of(self, program: object) -> Rules:
        return self.rules.get(str(program), Rules())


async def settle(
    conn: asyncpg.Connection, sold: list[Sold], leads: list[Stored], *, import_earns: bool = False
) -> list[WebhookEvent]:
    """The ledger rows the batch's newly attributed sales and counted leads earn (and the
    reversals ``first_sale`` and the once-per-customer lead call for); a
    ``commission.created`` notice for each new row. ``import_earns``: an import run with
    ``--commissions``, whose rows earn (the ``import`` dialect's rows otherwise earn nothing)."""
    sold = [s for s in sold if s.program_id is not None and s.affiliate_id is not None]
    leads = [s for s in leads if s.type is EventType.LEAD and s.link.program_id and s.link.affiliate_id]
    programs = sorted({str(s.program_id) for s in sold} | {str(s.link.program_id) for s in leads})
    if not programs:
        return []
    e = _Earning(conn, import_earns)
    found = await conn.fetch(_RULES, programs)
    e.rules = {str(r["id"]): Rules.from_json(r["commission"]) for r in found}
    e.ruled = {str(r["id"]) for r in found if r["commission"] not in (None, {}, "{}")}
    for lead in leads:
        _plan_lead(e, lead)
    for sale in sold:
        _plan_sale(e, sale)
    await _earn_months(e)
    await _earn_firsts(e, {sale.event_id for sale in sold}, {lead.envelope.event_id for lead in leads})
    return await _write(e)


def _plan_lead(e: _Earning, lead: Stored) -> None:
    """What a counted lead earns: its flat amount now where it names no customer; else its
    customer's group looked up (``_first_lead``), and a months program's timing too."""
    r = e.rules_of(lead.link.program_id)
    group, customer = r.lead_group(lead.text("name")), lead.text("external_id")
    if r.duration == "months" and customer is not None:
        e.timed[(lead.link.workspace_id, customer, str(lead.link.program_id))] = r
    if group is None:
        return
    if customer is None:  # no customer to earn once for: the lead alone
        if r.lead_flat > 0 and e.earns(lead.envelope.dialect):
            link = lead.link
            e.rows.append(
                _row(
                    link.workspace_id,
                    link.program_id,
                    link.affiliate_id,
                    link.id,
                    "lead",
                    lead.envelope.event_id,
                    None,
                    r.lead_flat,
                    r.lead_currency,
                    lead.at,
                    r,
                )
            )
        return
    # the customer's first lead earns what its rules pay, and takes back a later one's
    # that earned first, whatever the rules were then: under no lead_flat too, where
    # earlier rules may have paid one
    if r.lead_flat > 0 or str(lead.link.program_id) in e.ruled:
        e.groups[(lead.link.workspace_id, customer, str(lead.link.program_id), group)] = r


def _plan_sale(e: _Earning, sale: Sold) -> None:
    """A first_sale program's customer looked up (``_first_sale``); any other sale that
    earns something, by its span (``_earn_months``)."""
    r = e.rules_of(sale.program_id)
    if r.duration == "first_sale":
        e.firsts[(sale.workspace_id, sale.customer, str(sale.program_id))] = r
    elif r.for_sale(sale.amount, sale.currency) > 0 and e.earns(sale.dialect):
        e.months.append((sale, r))


async def _earn_months(e: _Earning) -> None:
    """The sales of ``_plan_sale``'s that earn: within their rules' span of the customer's
    first lead (``months``), or always (``lifetime``)."""
    first_lead = await _first_leads(e.conn, [s for s, r in e.months if r.duration == "months"])
    for sale, r in e.months:
        if r.within(sale.at, first_lead.get(sale.event_id)):
            e.rows.append(
                _row(
                    sale.workspace_id,
                    sale.program_id,
                    sale.affiliate_id,
                    sale.link_id,
                    "sale",
                    sale.event_id,
                    sale.customer,
                    r.for_sale(sale.amount, sale.currency),
                    sale.currency,
                    sale.at,
                    r,
                )
            )


async def _earn_firsts(e: _Earning, new: set[UUID], batch: set[UUID]) -> None:
    """Per customer, in key order: the first sale (``new``: the batch's sales), the first
    lead of each group (``batch``: the batch's leads), a months program's sales past the
    span of a first lead that is new."""
    for (ws, customer, program), r in sorted(e.firsts.items()):
        e.rows += await _first_sale(e.conn, ws, customer, program, r, new, e.earns)
    for (ws, customer, program, group), r in sorted(e.groups.items()):
        e.rows += await _first_lead(e.conn, ws, customer, program, group, r, batch, e.earns)
    for (ws, customer, program), r in sorted(e.timed.items()):
        e.rows += await _months_past(e.conn, ws, customer, program, r)


async def _write(e: _Earning) -> list[WebhookEvent]:
    """The rows into ``commissions`` (one statement); their notices, and clawbacks'."""
    if not e.rows:
        return []
    made = await e.conn.fetch(_INSERT, jsonrows.doc(e.rows))
    notices = [commission_notice(r) for r in made]
    # a sale refunded before it earned (attributed late): its refunds' clawbacks now
    if earning := sorted(r["source_id"] for r in made if r["kind"] == "sale"):
        notices += await refunds.clawbacks(e.conn, earning)
    return notices


async def _first_leads(conn: asyncpg.Connection, sold: list[Sold]) -> dict[UUID, datetime]:
    """Each sale's customer's first counted lead in the sale's program, by the sale's id."""
    if not sold:
        return {}
    found = await conn.fetch(
        _FIRST_LEADS, jsonrows.doc([(i, s.workspace_id, s.customer, s.program_id) for i, s in enumerate(sold)])
    )
    return {sold[r["i"]].event_id: r["first_at"] for r in found if r["first_at"] is not None}


async def _first_lead(
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
            _row(
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
                _row(
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


async def _months_past(
    conn: asyncpg.Connection, ws: str, customer: str, program: str, r: Rules
) -> list[tuple[Any, ...]]:
    """A lead stored after the customer's sales that is older than the lead they were timed
    from moves ``months``' start earlier: a sale ``months`` made earn that is now past the
    span is taken back (what it still stands at). What other rules granted stands."""
    found = await conn.fetch(_MONTHS_PAST, UUID(ws), customer, UUID(program), 30 * r.duration_months)
    return [
        _row(
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


async def _first_sale(
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
            _row(
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
                _row(
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
