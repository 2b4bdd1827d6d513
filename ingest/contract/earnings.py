"""The commission ledger as the rules say it should stand: a pure function of the history.

``expected(rules, leads, sales)`` applies each program's rules (``ingest.contract.commission``)
to the whole history (counted leads, sales with what their refunds took) and says what
each lead and sale should have earned, net: what it earned, less its ``first_sale`` or
once-per-customer reversal and its refunds' clawbacks. ``standing(rows)`` folds the
ledger's rows into the same shape, and ``differences`` names each that differs. The
workers (``workers.consumer.commissions``) write the ledger row by row as events arrive, in
any order; ``refstream reconcile`` and the tests' checkers compare it with this.

The rules, once more, as applied here (docs/http-api.md has worked examples):
- a sale earns when it is attributed to an affiliate of a program: ``sale_bps`` of its
  amount rounded down, plus ``sale_flat`` in the sale's currency (nothing in a currency the
  rules lack); ``lifetime``: always; ``months``: received within ``30 * duration_months``
  days of the customer's first counted lead in the program; ``first_sale``: only the
  customer's first attributed sale in the program (by received time, then event id);
  a sale of 0 earns nothing, and is not the first sale;
- its refunds take back ``earned * refunded // amount`` (all of it once refunded in full);
- ``lead_flat`` (in ``lead_currency``) is earned once per customer and program, by the
  first counted lead (received time, then event id); with ``lead_events``, once per
  customer, program and named event, and leads of other names earn nothing;
- rows of the ``import`` dialect are history: they earn nothing unless ``import_earns``
  (every import ran with ``--commissions``), and count as the customer's first lead or
  sale all the same.

Rules change over a history: the workers apply those in force when a row earns (a lead
when it is stored, a sale when it is attributed). A ``Lead`` or ``Sale`` may carry them
(``rules``); one that does not is judged by its program's ``rules`` as given (today's).
Whatever changed, a row derived from another is in that row's currency: a reversal takes a
commission back in the currency it was earned in, a clawback a sale commission's share in
its currency. ``standing`` nets the ledger per source and per currency, so a source that
nets to nothing in sum but not in each currency (+200 usd, -200 eur) is a difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from ingest.contract.commission import Rules

IMPORT_DIALECT = "import"  # the dialect of rows brought in by ``refstream import``


@dataclass(frozen=True, slots=True)
class Lead:
    """A customer's counted lead on an affiliate's link (``customer_leads``)."""

    event_id: UUID
    workspace_id: str
    customer: str | None
    name: str | None
    program_id: str
    received_at: datetime
    dialect: str
    rules: Rules | None = None  # the rules in force when it was stored (None: its program's)


@dataclass(frozen=True, slots=True)
class Sale:
    """A sale (``sales``); ``program_id`` None where it is unattributed or has no affiliate."""

    event_id: UUID
    workspace_id: str
    customer: str
    program_id: str | None
    amount: int
    currency: str
    refunded: int
    received_at: datetime
    dialect: str
    rules: Rules | None = None  # the rules in force when it was attributed (None: its program's)


Key = tuple[str, UUID]  # ("sale" | "lead", the source event's id)
Owed = tuple[int, str]  # net amount in minor units, currency


def expected(
    rules: Mapping[str, Rules], leads: Iterable[Lead], sales: Iterable[Sale], *, import_earns: bool = False
) -> dict[Key, Owed]:
    """What each sale and lead should net in the ledger by its program's ``rules`` (by program
    id; a program without rules earns nothing); sources that should net nothing are left out."""
    out: dict[Key, Owed] = {}

    def earns(dialect: str) -> bool:
        return dialect != IMPORT_DIALECT or import_earns

    first_lead: dict[tuple[str, str, str], datetime] = {}
    groups: dict[tuple[str, str, str, str], Lead] = {}
    for lead in sorted(leads, key=lambda x: (x.received_at, x.event_id)):
        r = lead.rules or rules.get(lead.program_id, Rules())
        if lead.customer is not None:
            first_lead.setdefault((lead.workspace_id, lead.customer, lead.program_id), lead.received_at)
        group = r.lead_group(lead.name)
        if group is None:
            continue
        pays = r.lead_flat > 0 and earns(lead.dialect)
        if lead.customer is None:
            if pays:
                out[("lead", lead.event_id)] = (r.lead_flat, r.lead_currency)
            continue
        key = (lead.workspace_id, lead.customer, lead.program_id, group)
        if key not in groups:  # the first: it earns what its rules pay (nothing, under none)
            groups[key] = lead
            if pays:
                out[("lead", lead.event_id)] = (r.lead_flat, r.lead_currency)

    first_sale: set[tuple[str, str, str]] = set()
    for sale in sorted(sales, key=lambda x: (x.received_at, x.event_id)):
        if sale.program_id is None or sale.amount <= 0:  # a sale of nothing earns, and is first, nowhere
            continue
        r = sale.rules or rules.get(sale.program_id, Rules())
        customer = (sale.workspace_id, sale.customer, sale.program_id)
        if r.duration == "first_sale":
            if customer in first_sale:
                continue
            first_sale.add(customer)
        elif not r.within(sale.received_at, first_lead.get(customer)):
            continue
        earned = r.for_sale(sale.amount, sale.currency)
        if earned <= 0 or not earns(sale.dialect):
            continue
        net = earned - (earned * sale.refunded // sale.amount if sale.amount > 0 else 0)
        if net:
            out[("sale", sale.event_id)] = (net, sale.currency)
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """A ledger row (``commissions``): ``source_id`` the sale or lead (a reversal's: the one it
    takes back; a clawback's: its refund, and ``sale_id`` its sale)."""

    kind: str
    source_id: UUID
    sale_id: UUID | None
    amount: int
    currency: str
    rule: str | None = None  # a reversal of a lead's: "lead"


def standing(rows: Iterable[Row]) -> dict[Key, Owed]:
    """The ledger's rows netted per sale and lead (a reversal on its source, a clawback on its
    sale) and per currency; sources that net nothing in every currency are left out. A source
    that nets something in more than one currency (a reversal booked in another currency than
    what it takes back) stands as their sum and ``"mixed:"`` with each currency's net, which no
    rule ever calls for: ``differences`` names it."""
    sums: dict[Key, dict[str, int]] = {}
    for row in rows:
        if row.kind == "clawback":
            if row.sale_id is None:
                continue
            key: Key = ("sale", row.sale_id)
        elif row.kind == "reversal":
            key = ("lead" if row.rule == "lead" else "sale", row.source_id)
        else:
            key = (row.kind, row.source_id)
        per = sums.setdefault(key, {})
        per[row.currency] = per.get(row.currency, 0) + row.amount
    out: dict[Key, Owed] = {}
    for k, per in sums.items():
        nets = sorted((c, v) for c, v in per.items() if v)
        if len(nets) == 1:
            out[k] = (nets[0][1], nets[0][0])
        elif nets:
            out[k] = (sum(v for _, v in nets), "mixed:" + ",".join(f"{c}{v:+d}" for c, v in nets))
    return out


def nets(rows: Iterable[Row]) -> dict[str, int]:
    """The ledger's rows netted per currency (currencies that net nothing left out)."""
    out: dict[str, int] = {}
    for row in rows:
        out[row.currency] = out.get(row.currency, 0) + row.amount
    return {c: v for c, v in out.items() if v}


def totals(owed: Mapping[Key, Owed]) -> dict[str, int]:
    """What ``expected`` (or ``standing``) says in all, per currency."""
    out: dict[str, int] = {}
    for amount, currency in owed.values():
        out[currency] = out.get(currency, 0) + amount
    return {c: v for c, v in out.items() if v}


def differences(want: Mapping[Key, Owed], have: Mapping[Key, Owed]) -> list[tuple[Key, Owed | None, Owed | None]]:
    """Each source whose standing differs from what the rules say: (key, expected, stored)."""
    return [
        (k, want.get(k), have.get(k))
        for k in sorted(want.keys() | have.keys(), key=lambda k: (k[0], str(k[1])))
        if want.get(k) != have.get(k)
    ]


# the rows ``expected`` and ``standing`` take, as SQL (``$1``: the workspace, or NULL for all)
LEADS_SQL = """
SELECT e.event_id, e.workspace_id::text, e.customer_external_id AS customer, e.name, e.program_id::text,
       e.received_at, e.dialect
FROM customer_leads e
WHERE e.program_id IS NOT NULL AND e.affiliate_id IS NOT NULL AND ($1::uuid IS NULL OR e.workspace_id = $1)
"""
SALES_SQL = """
SELECT s.event_id, s.workspace_id::text, s.customer_external_id AS customer,
       CASE WHEN s.affiliate_id IS NOT NULL AND s.unattributed IS NULL THEN s.program_id::text END AS program_id,
       s.amount, s.currency, s.refunded, s.received_at, s.dialect
FROM sales s WHERE $1::uuid IS NULL OR s.workspace_id = $1
"""
LEDGER_SQL = """
SELECT kind, source_id, sale_id, amount, currency, rule FROM commissions WHERE $1::uuid IS NULL OR workspace_id = $1
"""
RULES_SQL = "SELECT id::text, commission FROM programs WHERE $1::uuid IS NULL OR workspace_id = $1"
