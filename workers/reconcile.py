"""Recompute every counter from the event rows, report drift, and optionally repair it.

Counters are moved by the batches that insert events, in the same transaction, so they
can only drift when something else writes: a hand edit, a partial restore, a bug. The
event rows are the truth: per link, clicks (non-test; a bot's only where its workspace's
``bot_policy`` had it counted, which the worker records on the row as ``bot_counted``),
bot clicks, leads, conversions, unique clicks (distinct UTC day and visitor over counted
clicks) and last_clicked_at; the same per link and day in ``daily_stats``; and
``link_visitor_days``, the set that later batches test a visitor's first click of the day
against. Reading the decision from the row, not the workspace's policy today, keeps a
policy change what it is in the worker: from then on, never undone by ``--fix``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import structlog

from . import reconcile_drops
from .errors import is_retryable_in_place

log = structlog.get_logger("workers.reconcile")

COUNTERS = ("clicks", "unique_clicks", "bot_clicks", "leads", "conversions")
_LINK_COLUMNS = (*COUNTERS, "last_clicked_at", "visitor_days")

# a click that moves `clicks` (workers.counters.counts_as_click, as the worker decided it)
_COUNTED = "type = 1 AND (NOT is_bot OR bot_counted)"

# an event flagged under a rule its workspace excludes moved no counter (workers.fraud)
_NOT_EXCLUDED = "NOT EXISTS (SELECT 1 FROM event_flags f WHERE f.event_id = e.event_id AND f.excluded)"

# one scan of the events: what every (link, day) should hold
_DAYS = f"""
CREATE TEMP TABLE reconcile_days ON COMMIT DROP AS
SELECT e.link_id, (e.received_at AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE {_COUNTED}) AS clicks,
       count(DISTINCT visitor_key) FILTER (WHERE {_COUNTED}) AS unique_clicks,
       count(*) FILTER (WHERE type = 1 AND is_bot) AS bot_clicks,
       count(*) FILTER (WHERE type = 2) AS leads,
       count(*) FILTER (WHERE type = 3) AS conversions,
       max(received_at) FILTER (WHERE {_COUNTED}) AS last_clicked_at
FROM events e JOIN links l ON l.id = e.link_id
WHERE NOT e.test_mode AND NOT e.out_of_window AND {_NOT_EXCLUDED}
GROUP BY 1, 2
"""

_LINKS = """
SELECT l.id, l.code, l.clicks, l.unique_clicks, l.bot_clicks, l.leads, l.conversions, l.last_clicked_at,
       coalesce(v.n, 0) AS visitor_days, r.*
FROM links l
LEFT JOIN (SELECT link_id, count(*) AS n FROM link_visitor_days GROUP BY link_id) v ON v.link_id = l.id
CROSS JOIN LATERAL (
    SELECT coalesce(sum(d.clicks), 0)::bigint AS r_clicks, coalesce(sum(d.unique_clicks), 0)::bigint AS r_unique_clicks,
           coalesce(sum(d.bot_clicks), 0)::bigint AS r_bot_clicks, coalesce(sum(d.leads), 0)::bigint AS r_leads,
           coalesce(sum(d.conversions), 0)::bigint AS r_conversions, max(d.last_clicked_at) AS r_last_clicked_at,
           coalesce(sum(d.unique_clicks), 0)::bigint AS r_visitor_days
    FROM reconcile_days d WHERE d.link_id = l.id) r
WHERE (l.clicks, l.unique_clicks, l.bot_clicks, l.leads, l.conversions, l.last_clicked_at, coalesce(v.n, 0))
      IS DISTINCT FROM (r_clicks, r_unique_clicks, r_bot_clicks, r_leads, r_conversions, r_last_clicked_at,
                        r_visitor_days)
ORDER BY l.code
"""

_DAILY = """
SELECT l.code, coalesce(s.link_id, d.link_id) AS link_id, coalesce(s.day, d.day) AS day,
       coalesce(s.clicks, 0) AS clicks, coalesce(s.unique_clicks, 0) AS unique_clicks,
       coalesce(s.bot_clicks, 0) AS bot_clicks, coalesce(s.leads, 0) AS leads,
       coalesce(s.conversions, 0) AS conversions,
       coalesce(d.clicks, 0) AS r_clicks, coalesce(d.unique_clicks, 0) AS r_unique_clicks,
       coalesce(d.bot_clicks, 0) AS r_bot_clicks, coalesce(d.leads, 0) AS r_leads,
       coalesce(d.conversions, 0) AS r_conversions
FROM daily_stats s FULL JOIN reconcile_days d ON d.link_id = s.link_id AND d.day = s.day
JOIN links l ON l.id = coalesce(s.link_id, d.link_id)
WHERE s.link_id IS NULL OR d.link_id IS NULL
   OR (s.clicks, s.unique_clicks, s.bot_clicks, s.leads, s.conversions)
      IS DISTINCT FROM (d.clicks, d.unique_clicks, d.bot_clicks, d.leads, d.conversions)
ORDER BY l.code, 3
"""

_LOCK = "SELECT id FROM links ORDER BY id FOR UPDATE"

_FIX = (
    """
    UPDATE links l
    SET clicks = r.clicks, unique_clicks = r.unique_clicks, bot_clicks = r.bot_clicks, leads = r.leads,
        conversions = r.conversions, last_clicked_at = r.last_clicked_at, updated_at = now()
    FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                $7::timestamptz[]) AS r(id, clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at)
    WHERE l.id = r.id
    """,
    """
    DELETE FROM daily_stats s
    WHERE NOT EXISTS (SELECT 1 FROM reconcile_days d WHERE d.link_id = s.link_id AND d.day = s.day)
    """,
    """
    INSERT INTO daily_stats AS s (link_id, day, workspace_id, program_id, affiliate_id,
                                  clicks, unique_clicks, bot_clicks, leads, conversions)
    SELECT d.link_id, d.day, l.workspace_id, l.program_id, l.affiliate_id,
           d.clicks, d.unique_clicks, d.bot_clicks, d.leads, d.conversions
    FROM reconcile_days d JOIN links l ON l.id = d.link_id
    ORDER BY 1, 2
    ON CONFLICT (link_id, day) DO UPDATE
    SET clicks = EXCLUDED.clicks, unique_clicks = EXCLUDED.unique_clicks, bot_clicks = EXCLUDED.bot_clicks,
        leads = EXCLUDED.leads, conversions = EXCLUDED.conversions
    WHERE (s.clicks, s.unique_clicks, s.bot_clicks, s.leads, s.conversions)
          IS DISTINCT FROM (EXCLUDED.clicks, EXCLUDED.unique_clicks, EXCLUDED.bot_clicks, EXCLUDED.leads,
                            EXCLUDED.conversions)
    """,
    # the first-click-of-the-day set, rebuilt from the counted clicks: without it a later
    # batch would count a restored visitor as new (or a lost one as seen) and drift again
    f"""
    CREATE TEMP TABLE reconcile_visits ON COMMIT DROP AS
    SELECT DISTINCT e.link_id, (e.received_at AT TIME ZONE 'UTC')::date AS day, e.visitor_key
    FROM events e JOIN links l ON l.id = e.link_id
    WHERE {_COUNTED} AND NOT e.test_mode AND NOT e.out_of_window AND {_NOT_EXCLUDED} AND e.visitor_key IS NOT NULL
    """,
    """
    DELETE FROM link_visitor_days v WHERE NOT EXISTS (
        SELECT 1 FROM reconcile_visits r
        WHERE r.link_id = v.link_id AND r.day = v.day AND r.visitor_key = v.visitor_key)
    """,
    """
    INSERT INTO link_visitor_days (link_id, day, visitor_key)
    SELECT link_id, day, visitor_key FROM reconcile_visits ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
    """,
)

_RETRIES = 5


@dataclass(frozen=True, slots=True)
class Drift:
    """One counter that differs from its event rows; ``day`` is set for ``daily_stats``."""

    code: str
    counter: str
    stored: int | datetime | None
    recomputed: int | datetime | None
    day: date | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "counter": self.counter}
        if self.day is not None:
            out["day"] = self.day.isoformat()
        for k in ("stored", "recomputed"):
            v = getattr(self, k)
            out[k] = v.isoformat() if isinstance(v, datetime) else v
        return out


async def reconcile(pool: asyncpg.Pool, *, fix: bool) -> list[Drift]:
    """The drift between counters and event rows, found before any repair.

    Without ``fix``: read-only in effect, one snapshot (REPEATABLE READ), so the batches
    committing meanwhile (events and counters together) never show up as drift. With
    ``fix``: one transaction that first locks every link in id order (the order batches
    lock them in), so no batch moves a counter between the recount and the repair.
    """
    for attempt in range(1, _RETRIES + 1):
        try:
            async with pool.acquire() as conn:
                return await _reconcile(conn, fix)
        except Exception as exc:
            # a batch holding a link_visitor_days row we insert while waiting for our lock
            if not is_retryable_in_place(exc) or attempt == _RETRIES:
                raise
            log.warning("reconcile.retry", attempt=attempt, error=type(exc).__name__)
            await asyncio.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


async def _reconcile(conn: asyncpg.Connection, fix: bool) -> list[Drift]:
    async with conn.transaction(isolation="read_committed" if fix else "repeatable_read"):
        if fix:
            await conn.execute(_LOCK)
        await conn.execute(_DAYS)
        links = await conn.fetch(_LINKS)
        daily = await conn.fetch(_DAILY)
        drift = [
            Drift(r["code"], c, r[c], r[f"r_{c}"]) for r in links for c in _LINK_COLUMNS if r[c] != r[f"r_{c}"]
        ] + [Drift(r["code"], c, r[c], r[f"r_{c}"], r["day"]) for r in daily for c in COUNTERS if r[c] != r[f"r_{c}"]]
        if fix:
            await conn.execute(
                _FIX[0],
                [r["id"] for r in links],
                *([r[f"r_{c}"] for r in links] for c in COUNTERS),
                [r["r_last_clicked_at"] for r in links],
            )
            for statement in _FIX[1:]:
                await conn.execute(statement)
        # drop_stats: after the counters' repair, so the lock order stays the batches' (links first)
        drift += [
            Drift(r["code"], _drop_counter(r["reason"], r["detail"]), r["stored"], r["recomputed"], r["day"])
            for r in await reconcile_drops.drift(conn, fix=fix)
        ]  # fmt: skip
    log.info("reconcile", drift=len(drift), links=len(links), days=len(daily), fixed=fix)
    return drift


def _drop_counter(reason: str, detail: str) -> str:
    """``dropped.bot.ua_list``, ``dropped.unknown_code``, ``flagged.click_burst``."""
    head = "flagged" if reason == "flagged" else f"dropped.{reason}"
    return f"{head}.{detail}" if detail else head
