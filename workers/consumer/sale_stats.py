"""``sale_stats`` (``workers.consumer.sales``): the statement that moves it, a batch's
counts or a repair's differences added (``STATS``), and ``refstream reconcile``'s recount of
it and of each sale's refund totals from the rows (``drift``, ``repair``, ``refund_drift``)."""

from __future__ import annotations

from datetime import date, datetime
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows
from workers.consumer.drops import NO_LINK

STATS = f"""
INSERT INTO sale_stats AS t (workspace_id, link_id, day, currency, sales, amount, refunds, refunded)
{jsonrows.select(("uuid", "uuid", "date", "text", "bigint", "bigint", "bigint", "bigint"))}
ORDER BY 1, 2, 3, 4
ON CONFLICT (workspace_id, link_id, day, currency)
DO UPDATE SET sales = t.sales + EXCLUDED.sales, amount = t.amount + EXCLUDED.amount,
              refunds = t.refunds + EXCLUDED.refunds, refunded = t.refunded + EXCLUDED.refunded
"""

StatKey = tuple[str, str, date, str]  # workspace, link (nil: unattributed), day, currency


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
            STATS,
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
