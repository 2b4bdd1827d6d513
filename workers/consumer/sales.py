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
from datetime import date, datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import clicks, jsonrows
from ingest.contract.events import Envelope, EventType
from ingest.ledger import refunds
from ingest.ledger.outbox import WebhookEvent
from workers.consumer import commissions
from workers.consumer.drops import NO_LINK, NoRow
from workers.consumer.stored import Stored, ts

UNATTRIBUTED = "no_lead"

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

_STATS = f"""
INSERT INTO sale_stats AS t (workspace_id, link_id, day, currency, sales, amount, refunds, refunded)
{jsonrows.select(("uuid", "uuid", "date", "text", "bigint", "bigint", "bigint", "bigint"))}
ORDER BY 1, 2, 3, 4
ON CONFLICT (workspace_id, link_id, day, currency)
DO UPDATE SET sales = t.sales + EXCLUDED.sales, amount = t.amount + EXCLUDED.amount,
              refunds = t.refunds + EXCLUDED.refunds, refunded = t.refunded + EXCLUDED.refunded
"""

StatKey = tuple[str, str, date, str]  # workspace, link (nil: unattributed), day, currency


@dataclass(slots=True)
class Settled:
    """What a batch did to sales: rows inserted, copies of a sale held already, and the
    drops to settle with the batch's (new ones; those taken back by a late attribution)."""

    inserted: int = 0
    attributed_late: int = 0
    drops: list[NoRow] = field(default_factory=list)
    undrops: list[NoRow] = field(default_factory=list)
    notices: list[WebhookEvent] = field(default_factory=list)  # sale.created, one per new row


@dataclass(slots=True)
class _Row:
    envelope: Envelope
    at: datetime
    lead: asyncpg.Record | None = None

    def values(self) -> tuple[Any, ...]:
        p, lead = self.envelope.payload, self.lead
        return (
            self.envelope.event_id,
            self.envelope.workspace_id,
            _text(p.get("invoice")),
            p["external_id"],
            p["amount"],
            p["currency"],
            p["name"],
            p["processor"],
            _text(p.get("lead_name")),
            lead["event_id"] if lead else None,
            lead["click_id"] if lead else None,
            lead["link_id"] if lead else None,
            lead["affiliate_id"] if lead else None,
            lead["program_id"] if lead else None,
            None if lead else UNATTRIBUTED,
            self.envelope.dialect,
            self.at,
            p.get("metadata"),
        )

    def notice(self) -> WebhookEvent:
        """``sale.created``: the sale as stored; its link as attributed then (null: none yet)."""
        e, lead, p = self.envelope, self.lead, self.envelope.payload
        link = (
            {
                "id": str(lead["link_id"]),
                "program_id": _str(lead["program_id"]),
                "affiliate_id": _str(lead["affiliate_id"]),
            }
            if lead
            else None
        )
        data = {
            "event_id": str(e.event_id),
            "received_at": self.at.isoformat(),
            "invoice_id": _text(p.get("invoice")),
            "customer": {"external_id": p["external_id"]},
            "amount": p["amount"],
            "currency": p["currency"],
            "event_name": p["name"],
            "payment_processor": p["processor"],
            "link": link,
            "lead_event_id": _str(lead["event_id"]) if lead else None,
        }
        return WebhookEvent(e.workspace_id or "", "sale.created", e.event_id, "", data)


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def _text(v: object) -> str | None:
    return v if isinstance(v, str) else None


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
    rows = [_Row(e, ts(e.received_at_ms)) for e in sorted(sales, key=lambda e: e.event_id)]
    for r in await st.conn.fetch(
        _LEADS,
        jsonrows.doc(
            [
                (
                    i,
                    row.envelope.workspace_id,
                    row.envelope.payload["external_id"],
                    row.at,
                    _text(row.envelope.payload.get("lead_name")),
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


def _inserted(st: _Settling, row: _Row) -> None:
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


async def _invoices_held(conn: asyncpg.Connection, missed: list[_Row]) -> list[NoRow]:
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
            _STATS,
            jsonrows.doc([(*k, st.stats[k], st.amounts[k], st.refunded[k], st.refund_amounts[k]) for k in moved]),
        )


def _click(s: Stored) -> UUID | None:
    click_id = s.envelope.payload.get("click_id")
    return clicks.parse(click_id) if isinstance(click_id, str) else None


# ``refstream reconcile``: sale_stats recounted from the rows, per link (the nil uuid: the
# unattributed), UTC day and currency. $1 link ids, $2/$3 the window's days [from, to),
# $4/$5 the same as timestamps, $6 whether the chunk holds the nil link. One statement, so
# the stored sums and the rows are read in one snapshot.
_DRIFT = """
SELECT coalesce(s.workspace_id, r.workspace_id) AS workspace_id, coalesce(s.link_id, r.link_id) AS link_id,
       coalesce(s.day, r.day) AS day, coalesce(s.currency, r.currency) AS currency,
       coalesce(s.sales, 0) AS stored_sales, coalesce(s.amount, 0) AS stored_amount,
       coalesce(s.refunds, 0) AS stored_refunds, coalesce(s.refunded, 0) AS stored_refunded,
       coalesce(r.sales, 0) AS sales, coalesce(r.amount, 0) AS amount,
       coalesce(r.refunds, 0) AS refunds, coalesce(r.refunded, 0) AS refunded
FROM (SELECT * FROM sale_stats WHERE link_id = ANY($1::uuid[]) AND day >= $2 AND day < $3) s
FULL JOIN (
    SELECT x.workspace_id, coalesce(x.link_id, '00000000-0000-0000-0000-000000000000'::uuid) AS link_id,
           (x.received_at AT TIME ZONE 'UTC')::date AS day, x.currency, count(*)::bigint AS sales,
           sum(x.amount)::bigint AS amount, sum(f.n)::bigint AS refunds, sum(f.total)::bigint AS refunded
    FROM sales x
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, coalesce(sum(amount), 0) AS total FROM refunds WHERE sale_id = x.event_id
    ) f
    WHERE (x.link_id = ANY($1::uuid[]) OR ($6 AND x.link_id IS NULL)) AND x.received_at >= $4 AND x.received_at < $5
    GROUP BY 1, 2, 3, 4
) r USING (workspace_id, link_id, day, currency)
WHERE (coalesce(s.sales, 0), coalesce(s.amount, 0), coalesce(s.refunds, 0), coalesce(s.refunded, 0))
   <> (coalesce(r.sales, 0), coalesce(r.amount, 0), coalesce(r.refunds, 0), coalesce(r.refunded, 0))
ORDER BY 2, 3, 4, 1
"""


async def drift(
    conn: asyncpg.Connection, ids: list[UUID], edges: tuple[datetime, datetime], days: tuple[date, date]
) -> list[asyncpg.Record]:
    """Each (link, day, currency) of the links ``ids`` in the window whose stored sums differ
    from the rows: the stored and the recounted sales and amounts."""
    return list(await conn.fetch(_DRIFT, ids, *days, *edges, NO_LINK in ids))


async def repair(conn: asyncpg.Connection, found: list[asyncpg.Record]) -> None:
    """Add each difference ``drift`` found (not set the sum: batches that committed since
    moved their own counts on top, and a difference read in one snapshot stays right)."""
    if found:
        await conn.execute(
            _STATS,
            jsonrows.doc(
                [
                    (
                        r["workspace_id"],
                        r["link_id"],
                        r["day"],
                        r["currency"],
                        r["sales"] - r["stored_sales"],
                        r["amount"] - r["stored_amount"],
                        r["refunds"] - r["stored_refunds"],
                        r["refunded"] - r["stored_refunded"],
                    )
                    for r in sorted(
                        found, key=lambda r: (str(r["workspace_id"]), str(r["link_id"]), r["day"], r["currency"])
                    )
                ]
            ),
        )


# ``refstream reconcile``: each sale's refund totals (``refunds``, ``refunded``: the running
# totals a refund's 409 reads) recounted from its ``refunds`` rows; the chunk's sales as
# ``_DRIFT`` takes them ($1 link ids, $2/$3 the window's edges, $4 whether the chunk holds
# the nil link). One statement: the totals and the rows read in one snapshot, as a refund's
# transaction moves them together.
_RECOUNT = "SELECT count(*)::int AS refunds, coalesce(sum(amount), 0)::bigint AS refunded FROM refunds WHERE sale_id = "
_REFUNDS_DRIFT = f"""
SELECT s.event_id, s.link_id, (s.received_at AT TIME ZONE 'UTC')::date AS day, s.amount,
       s.refunds AS stored_refunds, s.refunded AS stored_refunded, r.refunds, r.refunded
FROM sales s CROSS JOIN LATERAL ({_RECOUNT} s.event_id) r
WHERE (s.link_id = ANY($1::uuid[]) OR ($4 AND s.link_id IS NULL)) AND s.received_at >= $2 AND s.received_at < $3
  AND (s.refunds, s.refunded) <> (r.refunds, r.refunded)
ORDER BY s.event_id
"""
# the repair: the sales' rows locked first, in a statement of their own, so the recount's
# snapshot (the next statement's) holds every refund committed before the lock, and none
# can be under way (a refund moves the totals under the same row lock); never past the
# sale's amount (its CHECK): such refunds rows are reported, not repaired
_LOCK_SALES = "SELECT 1 FROM sales WHERE event_id = ANY($1::uuid[]) ORDER BY event_id FOR UPDATE"
_SET_REFUNDS = f"""
UPDATE sales s SET refunds = r.refunds, refunded = r.refunded
FROM unnest($1::uuid[]) AS x(event_id) CROSS JOIN LATERAL ({_RECOUNT} x.event_id) r
WHERE s.event_id = x.event_id AND r.refunded <= s.amount AND (s.refunds, s.refunded) <> (r.refunds, r.refunded)
"""


async def refund_drift(
    conn: asyncpg.Connection, ids: list[UUID], edges: tuple[datetime, datetime], *, fix: bool
) -> list[asyncpg.Record]:
    """Each sale of the links ``ids`` received in the window whose refund totals differ from
    its refunds rows: the stored and the recounted ``refunds`` and ``refunded``. With ``fix``,
    set from the rows (before ``sale_stats`` is repaired: the lock order a refund keeps)."""
    found = list(await conn.fetch(_REFUNDS_DRIFT, ids, *edges, NO_LINK in ids))
    if fix and found:
        sale_ids = [r["event_id"] for r in found]
        await conn.execute(_LOCK_SALES, sale_ids)
        await conn.execute(_SET_REFUNDS, sale_ids)
    return found
