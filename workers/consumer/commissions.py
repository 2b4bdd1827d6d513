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
from workers.consumer.commission_history import first_lead, first_sale, months_past, row
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
# the customers' first counted lead in each program (``months`` counts from it)
_FIRST_LEADS = f"""
SELECT x.i, (SELECT min(e.received_at) FROM customer_leads e
             WHERE e.workspace_id = x.workspace_id AND e.customer_external_id = x.customer
               AND e.program_id = x.program_id AND e.affiliate_id IS NOT NULL) AS first_at
FROM {jsonrows.table(("int", "uuid", "text", "uuid"), "x(i, workspace_id, customer, program_id)")}
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
    customer's group looked up (``commission_history.first_lead``), and a months program's timing too."""
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
                row(
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
    """A first_sale program's customer looked up (``commission_history.first_sale``); any other sale that
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
                row(
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
        e.rows += await first_sale(e.conn, ws, customer, program, r, new, e.earns)
    for (ws, customer, program, group), r in sorted(e.groups.items()):
        e.rows += await first_lead(e.conn, ws, customer, program, group, r, batch, e.earns)
    for (ws, customer, program), r in sorted(e.timed.items()):
        e.rows += await months_past(e.conn, ws, customer, program, r)


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
