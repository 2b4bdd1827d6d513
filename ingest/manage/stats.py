"""Counted and dropped events per day, for a link or an affiliate's links (the stats routes
and ``refstream link show``); and the addresses an affiliate's key is used from.

Counted events come from ``daily_stats``, dropped ones from ``drop_stats`` (why they did
not count: ``ingest.contract.drops.REASONS``), flagged ones (``fraud``) from its ``flagged`` rows.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import clock
from ingest.contract.drops import FLAGGED
from ingest.contract.errors import Refused

COUNTED = ("clicks", "unique_clicks", "bot_clicks", "leads", "conversions")
MAX_DAYS = 366
DEFAULT_DAYS = 30


class BadRange(Refused, ValueError):
    """``from``/``to`` that are not dates, or not a range of at most ``MAX_DAYS``."""


def day_range(given_from: str | None, given_to: str | None) -> tuple[date, date]:
    """(from, to), both inclusive, UTC days; by default the last 30 days."""
    try:
        to = _day(given_to) if given_to is not None else clock.utcnow().date()
        start = _day(given_from) if given_from is not None else _days_before(to, DEFAULT_DAYS - 1)
    except ValueError:
        raise BadRange("from, to: dates as YYYY-MM-DD") from None
    if start > to:
        raise BadRange("from: on or before to")
    if (to - start).days >= MAX_DAYS:
        raise BadRange(f"from, to: at most {MAX_DAYS} days apart")
    return start, to


def _days_before(day: date, days: int) -> date:
    return date.fromordinal(max(1, day.toordinal() - days))


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day(given: str) -> date:
    """YYYY-MM-DD only (``date.fromisoformat`` takes other ISO forms too, which the
    document does not allow)."""
    if not _DAY.fullmatch(given):
        raise ValueError(given)
    return date.fromisoformat(given)


# each served by an index (tests/test_explain.py): daily_stats' and drop_stats_link's
# (link_id, day), links_affiliate, links' primary key
COUNTED_SQL = """
SELECT day, sum(clicks)::bigint AS clicks, sum(unique_clicks)::bigint AS unique_clicks,
       sum(bot_clicks)::bigint AS bot_clicks, sum(leads)::bigint AS leads, sum(conversions)::bigint AS conversions
FROM daily_stats WHERE link_id = ANY($1::uuid[]) AND day BETWEEN $2 AND $3 GROUP BY day
"""
DROPPED_SQL = """
SELECT day, reason, detail, sum(n)::bigint AS n
FROM drop_stats WHERE link_id = ANY($1::uuid[]) AND day BETWEEN $2 AND $3 GROUP BY day, reason, detail
"""
SOLD_SQL = """
SELECT day, currency, sum(sales)::bigint AS sales, sum(amount)::bigint AS revenue,
       sum(refunds)::bigint AS refunds, sum(refunded)::bigint AS refunded
FROM sale_stats WHERE link_id = ANY($1::uuid[]) AND day BETWEEN $2 AND $3 GROUP BY day, currency
"""


# commissions earned per day and currency (reversals subtracted), from the ledger itself
EARNED_SQL = """
SELECT (earned_at AT TIME ZONE 'UTC')::date AS day, currency, sum(amount)::bigint AS commission
FROM commissions
WHERE link_id = ANY($1::uuid[]) AND earned_at >= ($2::date::timestamp AT TIME ZONE 'UTC')
  AND earned_at < (($3::date + 1)::timestamp AT TIME ZONE 'UTC')
GROUP BY 1, 2
"""


# the same over a whole workspace ($1), the rows no link resolved for included (unknown
# codes, unattributed sales: the nil link): daily_stats_workspace, and the primary keys of
# drop_stats and sale_stats, which lead with the workspace
def _of_workspace(sql: str) -> str:
    return sql.replace("link_id = ANY($1::uuid[])", "workspace_id = $1::uuid")


WORKSPACE_SQL = (
    _of_workspace(COUNTED_SQL),
    _of_workspace(SOLD_SQL),
    _of_workspace(DROPPED_SQL),
    _of_workspace(EARNED_SQL),
)
LINK_OWNED_SQL = "SELECT id FROM links WHERE id = $1 AND workspace_id = $2"
AFFILIATE_LINKS_SQL = (
    "SELECT id, clicks, unique_clicks, leads, conversions FROM links WHERE workspace_id = $1 AND affiliate_id = $2"
)


async def per_day(
    conn: asyncpg.Connection,
    of: list[UUID] | UUID,
    start: date,
    to: date,
    sql: tuple[str, str, str, str] = (COUNTED_SQL, SOLD_SQL, DROPPED_SQL, EARNED_SQL),
) -> dict[str, Any]:
    """Totals and one entry per day with anything in it: counted, sales, revenue, the
    refunds of those sales (their number and amount) and commission (net of reversals and
    clawbacks) per currency (minor units), dropped by reason (with the detail, e.g. the bot's sub-reason),
    flagged by rule; of the links ``of`` (or, with ``WORKSPACE_SQL``, the workspace ``of``)."""
    counted_sql, sold_sql, dropped_sql, earned_sql = sql
    days: dict[date, dict[str, Any]] = defaultdict(_empty_day)
    for r in await conn.fetch(counted_sql, of, start, to):
        days[r["day"]].update({k: r[k] for k in COUNTED})
    for r in await conn.fetch(sold_sql, of, start, to):
        if r["sales"] or r["revenue"] or r["refunds"]:  # a day's sale attributed later elsewhere nets to nothing
            d = days[r["day"]]
            for group in ("sales", "revenue", "refunds", "refunded"):  # refunds: of the day's sales
                d[group][r["currency"]] = r[group]
    for r in await conn.fetch(earned_sql, of, start, to):
        if r["commission"]:
            days[r["day"]]["commission"][r["currency"]] = r["commission"]
    for r in await conn.fetch(dropped_sql, of, start, to):
        d = days[r["day"]]
        if r["reason"] == FLAGGED:
            d["flagged"][r["detail"]] = d["flagged"].get(r["detail"], 0) + r["n"]
            continue
        d["dropped"][r["reason"]] = d["dropped"].get(r["reason"], 0) + r["n"]
        if r["detail"]:
            by = d["dropped_detail"].setdefault(r["reason"], {})
            by[r["detail"]] = by.get(r["detail"], 0) + r["n"]
    totals = _empty_day()
    for d in days.values():
        for k in COUNTED:
            totals[k] += d[k]
        for group in ("dropped", "flagged", "sales", "revenue", "refunds", "refunded", "commission"):
            for k, n in d[group].items():
                totals[group][k] = totals[group].get(k, 0) + n
        for reason, by in d["dropped_detail"].items():
            for k, n in by.items():
                totals["dropped_detail"].setdefault(reason, {})
                totals["dropped_detail"][reason][k] = totals["dropped_detail"][reason].get(k, 0) + n
    return {
        "from": start.isoformat(),
        "to": to.isoformat(),
        "totals": totals,
        "daily": [{"day": day.isoformat(), **days[day]} for day in sorted(days)],
    }


def _empty_day() -> dict[str, Any]:
    groups = ("sales", "revenue", "refunds", "refunded", "commission", "dropped", "dropped_detail", "flagged")
    return {**dict.fromkeys(COUNTED, 0), **{g: {} for g in groups}}


async def link_stats(
    conn: asyncpg.Connection, workspace_id: str, link_id: UUID, start: date, to: date
) -> dict[str, Any] | None:
    owned = await conn.fetchval(LINK_OWNED_SQL, link_id, UUID(workspace_id))
    if owned is None:
        return None
    return {"link_id": str(link_id), **await per_day(conn, [link_id], start, to)}


async def workspace_stats(conn: asyncpg.Connection, workspace_id: str, start: date, to: date) -> dict[str, Any]:
    """The whole workspace: every link's, and what no link resolved for (unknown codes,
    sales credited to no affiliate: ``no_lead``)."""
    return {"workspace_id": workspace_id, **await per_day(conn, UUID(workspace_id), start, to, WORKSPACE_SQL)}


async def affiliate_stats(
    conn: asyncpg.Connection, workspace_id: str, affiliate_id: str, start: date, to: date
) -> dict[str, Any]:
    """The affiliate's own links only: their counters now, and per day in the range."""
    rows = await conn.fetch(AFFILIATE_LINKS_SQL, UUID(workspace_id), UUID(affiliate_id))
    out: dict[str, Any] = {"affiliate_id": affiliate_id, "links": len(rows)}
    for k in ("clicks", "unique_clicks", "leads", "conversions"):
        out[k] = sum(r[k] for r in rows)
    return {**out, **await per_day(conn, [r["id"] for r in rows], start, to)}


# one row per (affiliate, address), its last_seen moved at most hourly: a cheap write on a
# low-volume route, and what the fraud rule affiliate_ip reads
_SEEN = """
INSERT INTO affiliate_ips AS a (affiliate_id, ip) VALUES ($1, $2::inet)
ON CONFLICT (affiliate_id, ip) DO UPDATE SET last_seen = now()
WHERE a.last_seen < now() - interval '1 hour'
"""


async def affiliate_seen(conn: asyncpg.Connection, affiliate_id: str, ip: str | None) -> None:
    """Remember that the affiliate's key was used from ``ip``."""
    if ip:
        await conn.execute(_SEEN, UUID(affiliate_id), ip)
