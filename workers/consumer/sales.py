"""Sales: one row per counted sale in ``sales``, in the batch's transaction, exactly once.

A sale is attributed to its customer's lead: the newest lead of that customer (its
external id, in the sale's workspace; of ``leadEventName`` when the sale names one) that
was received before the sale and counted (not in test mode, out of its own window, or
excluded by the workspace's fraud policy), however long before the sale. Each counted
lead is kept as its customer's in ``customer_leads``, in the batch that counts it, past the
event retention (the events' partitions are dropped after it; the customer stays the
affiliate's). The program's
cookie window decided whether that lead was credited to its click (a lead past it is
``out_of_window`` and attributes nothing); a customer the lead credited stays the
affiliate's for every later sale, and the program's commission rules (their duration:
``lifetime``, ``months`` from the customer's first lead, ``first_sale``) decide which of
those sales earn (``workers.consumer.commissions``).
Through the lead it has the click, the link, the affiliate and the program. A sale with no
such lead is stored and counted as unattributed (``unattributed = 'no_lead'``, and a
``no_lead`` drop the tenant sees in its drop stats).

The outcome depends on when the lead and the sale were received, never on the order the
workers process them in: a lead stored after a sale it precedes (the two sit in different
partitions) attributes that sale then, in the lead's transaction, and takes its drop back.
Both paths hold a transaction-scoped advisory lock per customer while they look, so a sale
and its lead committed at the same moment cannot each miss the other.

Exactly once: the row's key is the event id (a redelivery or a replay inserts nothing),
and ``(workspace, invoice)`` is unique: a second sale of one invoice, by any path, inserts
nothing and is a ``duplicate`` drop. Counters move only from the rows an insert or the
late attribution returned: ``sale_stats`` per link (the nil uuid: unattributed), UTC day
and currency.

Each new row is a ``sale.created`` webhook (its link as attributed when stored; null when
not yet), recorded with the batch's other deliveries.

Lock order, after the batch's events, links, stats and customers: the customers' advisory
locks (sorted), ``customer_leads`` (by event id), ``sales`` (late attribution, then the new rows, each by event id),
``sale_stats`` (one statement, key order), ``commissions``; the webhook deliveries and the
drops follow.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from ingest.contract import clicks, jsonrows
from ingest.contract.events import Envelope, EventType
from ingest.ledger import refunds
from ingest.ledger.outbox import WebhookEvent
from workers.consumer import commissions
from workers.consumer.drops import NO_LINK, NoRow
from workers.consumer.sale_row import UNATTRIBUTED, SaleRow, as_text
from workers.consumer.sale_stats import STATS, StatKey
from workers.consumer.sale_stats import drift as drift
from workers.consumer.sale_stats import refund_drift as refund_drift
from workers.consumer.sale_stats import repair as repair
from workers.consumer.stored import Stored, ts

# the batch's counted leads, kept as their customers' (``customer_leads``: past the event
# retention, what attributes the customers' sales and times the commission rules)
_KEEP_LEADS = f"""
INSERT INTO customer_leads (event_id, workspace_id, customer_external_id, name, link_id, click_id, affiliate_id,
                            program_id, dialect, received_at)
{jsonrows.select(("uuid", "uuid", "text", "text", "uuid", "uuid", "uuid", "uuid", "text", "timestamptz"))}
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
"""
# x: the batch's sales (index, workspace, customer, received, lead event name)
_LEADS = f"""
SELECT x.i, l.event_id, l.click_id, l.link_id, l.affiliate_id, l.program_id, l.received_at AS lead_at
FROM {jsonrows.table(("int", "uuid", "text", "timestamptz", "text"), "x(i, workspace_id, customer, at, lead_name)")}
CROSS JOIN LATERAL (
    SELECT e.event_id, e.click_id, e.link_id, e.affiliate_id, e.program_id, e.received_at
    FROM customer_leads e
    WHERE e.workspace_id = x.workspace_id AND e.customer_external_id = x.customer AND e.received_at <= x.at
      AND (x.lead_name IS NULL OR e.name = x.lead_name)
    ORDER BY e.received_at DESC, e.event_id DESC
    LIMIT 1
) l
"""

_COLUMNS = (
    ("event_id", "uuid"),
    ("workspace_id", "uuid"),
    ("invoice_id", "text"),
    ("customer_external_id", "text"),
    ("amount", "bigint"),
    ("currency", "text"),
    ("event_name", "text"),
    ("payment_processor", "text"),
    ("lead_event_name", "text"),
    ("lead_event_id", "uuid"),
    ("click_id", "uuid"),
    ("link_id", "uuid"),
    ("affiliate_id", "uuid"),
    ("program_id", "uuid"),
    ("unattributed", "text"),
    ("dialect", "text"),
    ("received_at", "timestamptz"),
    ("metadata", "jsonb"),
)
_INSERT = f"""
INSERT INTO sales ({", ".join(name for name, _ in _COLUMNS)})
{jsonrows.select([t for _, t in _COLUMNS])}
ORDER BY 1
ON CONFLICT DO NOTHING
RETURNING event_id
"""
# of the sales that inserted nothing, those whose invoice another sale holds (not a copy of themselves)
_INVOICE_HELD = f"""
SELECT x.event_id
FROM {jsonrows.table(("uuid", "uuid", "text"), "x(event_id, workspace_id, invoice_id)")}
JOIN sales s ON s.workspace_id = x.workspace_id AND s.invoice_id = x.invoice_id
WHERE s.event_id <> x.event_id
"""

# the unattributed sales a batch's new leads precede (however long after): attributed to
# the newest such lead, in event-id order
_LATE = f"""
WITH lead AS (
    SELECT l.event_id, l.workspace_id, l.customer, l.name, l.at, l.click_id, l.link_id, l.affiliate_id,
           l.program_id
    FROM {
    jsonrows.table(
        ("uuid", "uuid", "text", "text", "timestamptz", "uuid", "uuid", "uuid", "uuid"),
        "l(event_id, workspace_id, customer, name, at, click_id, link_id, affiliate_id, program_id)",
    )
}
), picked AS (
    SELECT DISTINCT ON (s.event_id) s.event_id, lead.event_id AS lead_event_id, lead.click_id, lead.link_id,
           lead.affiliate_id, lead.program_id, lead.at AS lead_at
    FROM sales s
    JOIN lead ON s.workspace_id = lead.workspace_id AND s.customer_external_id = lead.customer
    WHERE s.unattributed = 'no_lead' AND s.received_at >= lead.at
      AND (s.lead_event_name IS NULL OR s.lead_event_name = lead.name)
    ORDER BY s.event_id, lead.at DESC, lead.event_id DESC
), locked AS (
    SELECT s.event_id FROM sales s JOIN picked USING (event_id) ORDER BY s.event_id FOR UPDATE OF s
)
UPDATE sales s
SET lead_event_id = picked.lead_event_id, click_id = picked.click_id, link_id = picked.link_id,
    affiliate_id = picked.affiliate_id, program_id = picked.program_id, unattributed = NULL
FROM picked JOIN locked USING (event_id)
WHERE s.event_id = picked.event_id AND s.unattributed = 'no_lead'
RETURNING s.event_id, s.workspace_id, s.link_id, s.currency, s.amount, s.received_at, s.customer_external_id,
          s.affiliate_id, s.program_id, s.dialect, s.refunds, s.refunded
"""


@dataclass(slots=True)
class Settled:
    """What a batch did to sales: rows inserted, copies of a sale held already, and the
    drops to settle with the batch's (new ones; those taken back by a late attribution)."""

    inserted: int = 0
    attributed_late: int = 0
    drops: list[NoRow] = field(default_factory=list)
    undrops: list[NoRow] = field(default_factory=list)
    notices: list[WebhookEvent] = field(default_factory=list)  # sale.created, one per new row


@dataclass(slots=True, eq=False)
class _Settling:
    """One batch's sales as ``settle``'s steps move them: what it did, the ``sale_stats``
    to move (by key), and the sales that earn."""

    conn: asyncpg.Connection
    out: Settled = field(default_factory=Settled)
    stats: Counter[StatKey] = field(default_factory=Counter)
    amounts: Counter[StatKey] = field(default_factory=Counter)
    # refunds, and then their amount, of a sale attributed late
    refunded: Counter[StatKey] = field(default_factory=Counter)
    refund_amounts: Counter[StatKey] = field(default_factory=Counter)
    earned: list[commissions.Sold] = field(default_factory=list)


async def settle(
    conn: asyncpg.Connection,
    sales: list[Envelope],
    leads: list[Stored],
    counted: list[Stored] | None = None,
    *,
    import_earns: bool = False,
) -> Settled:
    """Store the batch's new ``sales`` and attribute earlier sales its newly stored
    ``leads`` precede; move ``sale_stats`` from what came back; the commissions the
    attributed sales and the ``counted`` leads earn (``workers.consumer.commissions``: an
    imported row earns only where ``import_earns``, an import run with ``--commissions``;
    a live sale an imported lead attributes earns all the same). In the module doc's lock
    order: each step's statements after the one's before."""
    st = _Settling(conn)
    leads = [s for s in leads if s.type is EventType.LEAD and isinstance(s.envelope.payload.get("external_id"), str)]
    counted = [s for s in counted or [] if s.type is EventType.LEAD]
    if not sales and not leads and not counted:
        return st.out
    await _lock_customers(conn, sales, leads, counted)
    if leads:
        await _keep_leads(conn, leads)
        await _attribute_late(st, leads)
    if sales:
        await _insert_new(st, sales)
    await _move_stats(st)
    st.out.notices += await commissions.settle(conn, st.earned, counted, import_earns=import_earns)
    return st.out


async def _lock_customers(
    conn: asyncpg.Connection, sales: list[Envelope], leads: list[Stored], counted: list[Stored]
) -> None:
    """The customers' advisory locks (sorted: ``refunds.lock_customers``), first."""
    await refunds.lock_customers(
        conn,
        [(e.workspace_id or "", e.payload["external_id"]) for e in sales]
        + [(s.link.workspace_id, s.envelope.payload["external_id"]) for s in leads]
        + [(s.link.workspace_id, c) for s in counted if (c := s.text("external_id"))],
    )


async def _keep_leads(conn: asyncpg.Connection, leads: list[Stored]) -> None:
    """The batch's new leads kept as their customers' (``customer_leads``, by event id)."""
    await conn.execute(
        _KEEP_LEADS,
        jsonrows.doc(
            [
                (
                    s.envelope.event_id,
                    s.link.workspace_id,
                    s.envelope.payload["external_id"],
                    s.text("name"),
                    s.link.id,
                    _click(s),
                    s.link.affiliate_id,
                    s.link.program_id,
                    s.envelope.dialect,
                    s.at,
                )
                for s in sorted(leads, key=lambda s: s.envelope.event_id)
            ]
        ),
    )


async def _attribute_late(st: _Settling, leads: list[Stored]) -> None:
    """The unattributed sales the batch's new leads precede, attributed (``_LATE``, by event
    id): their stats and refunds moved from the nil link to the lead's, their drops taken
    back, and each a sale that may earn."""
    for r in await st.conn.fetch(
        _LATE,
        jsonrows.doc(
            [
                (
                    s.envelope.event_id,
                    s.link.workspace_id,
                    s.envelope.payload["external_id"],
                    s.text("name"),
                    s.at,
                    _click(s),
                    s.link.id,
                    s.link.affiliate_id,
                    s.link.program_id,
                )
                for s in sorted(leads, key=lambda s: s.envelope.event_id)
            ]
        ),
    ):
        _attributed_late(st, r)


def _attributed_late(st: _Settling, r: asyncpg.Record) -> None:
    """What one sale attributed late (a row ``_LATE`` returned) moves."""
    ws, day, cur = str(r["workspace_id"]), r["received_at"].date(), r["currency"]
    st.stats[(ws, str(NO_LINK), day, cur)] -= 1
    st.amounts[(ws, str(NO_LINK), day, cur)] -= r["amount"]
    st.stats[(ws, str(r["link_id"]), day, cur)] += 1
    st.amounts[(ws, str(r["link_id"]), day, cur)] += r["amount"]
    for link, sign in ((str(NO_LINK), -1), (str(r["link_id"]), 1)):  # its refunds move with it
        st.refunded[(ws, link, day, cur)] += sign * r["refunds"]
        st.refund_amounts[(ws, link, day, cur)] += sign * r["refunded"]
    st.out.undrops.append(NoRow(r["event_id"], ws, None, UNATTRIBUTED, r["received_at"]))
    st.out.attributed_late += 1
    st.earned.append(
        commissions.Sold(
            r["event_id"],
            ws,
            r["customer_external_id"],
            r["program_id"],
            r["affiliate_id"],
            r["link_id"],
            r["amount"],
            cur,
            r["received_at"],
            r["dialect"],
        )
    )


async def _insert_new(st: _Settling, sales: list[Envelope]) -> None:
    """The batch's sales (by event id): each one's lead found (``_LEADS``), the rows
    inserted (``_INSERT``), what the new ones move, and the invoices another sale held."""
    rows = [SaleRow(e, ts(e.received_at_ms)) for e in sorted(sales, key=lambda e: e.event_id)]
    for r in await st.conn.fetch(
        _LEADS,
        jsonrows.doc(
            [
                (
                    i,
                    row.envelope.workspace_id,
                    row.envelope.payload["external_id"],
                    row.at,
                    as_text(row.envelope.payload.get("lead_name")),
                )
                for i, row in enumerate(rows)
            ]
        ),
    ):
        rows[r["i"]].lead = r
    inserted = {r["event_id"] for r in await st.conn.fetch(_INSERT, jsonrows.doc([row.values() for row in rows]))}
    st.out.inserted = len(inserted)
    for row in rows:
        if row.envelope.event_id in inserted:
            _inserted(st, row)
    missed = [row for row in rows if row.envelope.event_id not in inserted and row.envelope.payload.get("invoice")]
    if missed:
        st.out.drops += await _invoices_held(st.conn, missed)


def _inserted(st: _Settling, row: SaleRow) -> None:
    """What one new sale moves: its stats, its drop when unattributed (or else a sale that
    may earn), its ``sale.created``."""
    e, ws = row.envelope, row.envelope.workspace_id or ""
    link = str(row.lead["link_id"]) if row.lead else str(NO_LINK)
    st.stats[(ws, link, row.at.date(), e.payload["currency"])] += 1
    st.amounts[(ws, link, row.at.date(), e.payload["currency"])] += e.payload["amount"]
    if row.lead is None:
        st.out.drops.append(NoRow(e.event_id, ws, None, UNATTRIBUTED, row.at))
    else:
        lead = row.lead
        st.earned.append(
            commissions.Sold(
                e.event_id,
                ws,
                e.payload["external_id"],
                lead["program_id"],
                lead["affiliate_id"],
                lead["link_id"],
                e.payload["amount"],
                e.payload["currency"],
                row.at,
                e.dialect,
            )
        )
    st.out.notices.append(row.notice())


async def _invoices_held(conn: asyncpg.Connection, missed: list[SaleRow]) -> list[NoRow]:
    """Of the sales with an invoice that inserted nothing, those whose invoice another sale
    holds: ``duplicate`` drops (a copy of the sale itself is none)."""
    held = await conn.fetch(
        _INVOICE_HELD,
        jsonrows.doc(
            [(row.envelope.event_id, row.envelope.workspace_id, row.envelope.payload["invoice"]) for row in missed]
        ),
    )
    others = {r["event_id"] for r in held}
    return [
        NoRow(row.envelope.event_id, row.envelope.workspace_id, None, "duplicate", row.at)
        for row in missed
        if row.envelope.event_id in others
    ]


async def _move_stats(st: _Settling) -> None:
    """``sale_stats`` moved by what the steps before counted: one statement, in key order."""
    moved = sorted(
        k
        for k in st.stats.keys() | st.refunded.keys()
        if st.stats[k] or st.amounts[k] or st.refunded[k] or st.refund_amounts[k]
    )
    if moved:
        await st.conn.execute(
            STATS,
            jsonrows.doc([(*k, st.stats[k], st.amounts[k], st.refunded[k], st.refund_amounts[k]) for k in moved]),
        )


def _click(s: Stored) -> UUID | None:
    click_id = s.envelope.payload.get("click_id")
    return clicks.parse(click_id) if isinstance(click_id, str) else None
