"""Counters, moved only from a batch's newly inserted (non-test) events, in its transaction.

Per link: clicks, unique clicks, bot clicks, leads, conversions, last_clicked_at; per link
and UTC day the same in ``daily_stats`` (per affiliate and program by GROUP BY). A bot's
click always counts in bot clicks; as a click too (unique clicks and last_clicked_at
included) only when its workspace's ``bot_policy`` is ``count``, else never (``exclude``,
the default). Aggregated per link and day per batch, and
written in one statement (``_APPLY``): one UPDATE row per link however viral, locks taken
in link-id order. Milestones (seed 001's
"refer 5 friends") are reached from the new conversion totals, each once.

Lock order, the same in every batch so that none waits in a circle: event_dedupe, then
events (see store),
link_visitor_days in key order, links in id order, daily_stats in key order, then the
converting affiliates in id order and their milestone rows in key order. A batch that
locks no row after those (``workers.consumer.store``: clicks that make no customer) writes
its drops (``drop_stats``, every batch's last rows) in the same statement.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows, plans
from ingest.contract.events import EventType
from ingest.contract.links import LinkInfo
from workers.consumer import drops
from workers.consumer.stored import Stored

# NO KEY UPDATE: the foreign-key checks of customer, link and milestone rows (KEY SHARE) pass
# (one plan, whatever the ids: ``ingest.contract.plans``)
_LOCK_AFFILIATES = f"SELECT 1 FROM affiliates WHERE id = {plans.any_of(1, 'uuid')} ORDER BY id FOR NO KEY UPDATE"

# One statement, four writes, in the lock order above: a batch's first clicks of a
# visitor on a link that day (``link_visitor_days``, a set: the rows that come back are the
# new ones), then its links, then its days, then its drops (``$3``, else none:
# ``drop_stats`` is the last row a batch locks, so only a batch that locks nothing after
# its counters passes them here; ``workers.consumer.store``). Data-modifying CTEs run in no
# order of their own, so each step waits on the one before by a one-time filter on its
# result (``(SELECT count(*) FROM prev) >= 0``, evaluated before the step reads its first
# row): the links are locked, in id order, only once every visitor row is in, the days
# written only once every link is, the drops once every day is. The links' CTE takes its
# locks above its sort, so in id order whatever the plan, and a row a concurrent batch
# changed is locked in its newest version, from which the UPDATE recomputes its sums (READ
# COMMITTED's recheck). ``$1``: the visits (link, day, visitor key); ``$2``: the counts per
# link and day, unique clicks without the visits; ``$3``: the drops (``drops.add_rows``).
_DAYS = jsonrows.table(
    ("uuid", "date", "uuid", "uuid", "uuid", "bigint", "bigint", "bigint", "bigint", "timestamptz"),
    "d(link_id, day, workspace_id, program_id, affiliate_id, clicks, bot_clicks, leads, conversions, last_at)",
    param=2,
)
_APPLY = f"""
WITH visited AS (
    INSERT INTO link_visitor_days (link_id, day, visitor_key)
    {jsonrows.select(("uuid", "date", "text"))} ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
    RETURNING link_id, day
),
firsts AS MATERIALIZED (SELECT link_id, day, count(*) AS n FROM visited GROUP BY link_id, day),
days AS MATERIALIZED (
    SELECT d.*, coalesce(f.n, 0) AS unique_clicks FROM {_DAYS} LEFT JOIN firsts f USING (link_id, day)
),
locked AS MATERIALIZED (
    SELECT id FROM links WHERE id IN (SELECT link_id FROM days) AND (SELECT count(*) FROM firsts) >= 0
    ORDER BY id FOR NO KEY UPDATE
),
linked AS (
    UPDATE links l
    SET clicks = l.clicks + t.clicks,
        unique_clicks = l.unique_clicks + t.unique_clicks,
        bot_clicks = l.bot_clicks + t.bot_clicks,
        leads = l.leads + t.leads,
        conversions = l.conversions + t.conversions,
        last_clicked_at = GREATEST(l.last_clicked_at, t.last_at),
        updated_at = now()
    FROM locked k, (
        SELECT link_id, sum(clicks)::bigint AS clicks, sum(unique_clicks)::bigint AS unique_clicks,
               sum(bot_clicks)::bigint AS bot_clicks, sum(leads)::bigint AS leads,
               sum(conversions)::bigint AS conversions, max(last_at) AS last_at
        FROM days GROUP BY link_id
    ) t
    WHERE l.id = k.id AND t.link_id = k.id
    RETURNING 1
),
dated AS (
    INSERT INTO daily_stats AS s (link_id, day, workspace_id, program_id, affiliate_id,
                                  clicks, unique_clicks, bot_clicks, leads, conversions)
    SELECT link_id, day, workspace_id, program_id, affiliate_id, clicks, unique_clicks, bot_clicks, leads, conversions
    FROM days WHERE (SELECT count(*) FROM linked) >= 0
    ORDER BY 1, 2
    ON CONFLICT (link_id, day) DO UPDATE
    SET clicks = s.clicks + EXCLUDED.clicks,
        unique_clicks = s.unique_clicks + EXCLUDED.unique_clicks,
        bot_clicks = s.bot_clicks + EXCLUDED.bot_clicks,
        leads = s.leads + EXCLUDED.leads,
        conversions = s.conversions + EXCLUDED.conversions
    RETURNING 1
)
{drops.add_rows(source="'worker'", param=3, gate=" WHERE (SELECT count(*) FROM dated) >= 0").lstrip()}"""

_MILESTONES = """
INSERT INTO affiliate_milestones (affiliate_id, milestone_id, reached_at)
SELECT t.affiliate_id, m.id, $2
FROM (SELECT affiliate_id, sum(conversions) AS total FROM links
      WHERE affiliate_id = ANY($1::uuid[]) GROUP BY affiliate_id) t
JOIN affiliates a ON a.id = t.affiliate_id
JOIN milestones m ON m.program_id = a.program_id AND m.threshold <= t.total
ORDER BY 1, 2
ON CONFLICT DO NOTHING
RETURNING affiliate_id, milestone_id, reached_at
"""


def lead_quantity(payload: dict[str, Any]) -> int:
    """How many leads a lead event counts: its ``quantity`` (Dub's ``eventQuantity``, an
    integer the edge bounds), else 1. ``LEAD_QUANTITY`` is the same in SQL."""
    q = payload.get("quantity")
    return q if type(q) is int and 1 < q < 10**9 else 1


# lead_quantity of an `events` row (alias e), for whatever recounts leads from the rows
LEAD_QUANTITY = (
    "CASE WHEN jsonb_typeof(e.payload->'quantity') = 'number' AND (e.payload->>'quantity') ~ '^[0-9]{1,9}$'"
    " THEN greatest((e.payload->>'quantity')::int, 1) ELSE 1 END"
)


@dataclass(slots=True)
class _Counts:
    clicks: int = 0
    bot_clicks: int = 0
    leads: int = 0
    conversions: int = 0
    last_clicked_at: datetime | None = None

    def add(self, s: Stored, counted: bool) -> None:
        if s.type is EventType.CLICK:
            if s.is_bot:
                self.bot_clicks += 1
            if not counted:
                return
            self.clicks += 1
            if self.last_clicked_at is None or s.at > self.last_clicked_at:
                self.last_clicked_at = s.at
        elif s.type is EventType.LEAD:
            self.leads += lead_quantity(s.envelope.payload)
        else:
            self.conversions += 1


@dataclass(frozen=True, slots=True)
class MilestoneReached:
    affiliate_id: UUID
    milestone_id: UUID
    reached_at: datetime


def counts_as_click(s: Stored, count_bots: Collection[str]) -> bool:
    """A click that moves ``clicks``: a person's, or a bot's in a workspace whose
    ``bot_policy`` is ``count`` (``count_bots``: those workspaces' ids)."""
    return s.type is EventType.CLICK and (not s.is_bot or s.link.workspace_id in count_bots)


async def apply(
    conn: asyncpg.Connection,
    events: list[Stored],
    *,
    count_bots: Collection[str] = (),
    dropped: Counter[drops.Key] | None = None,
) -> list[MilestoneReached]:
    """Move the counters of ``events``; with ``dropped`` (``drops.tally``'s, of a batch that
    locks no row after this), its drops too, in the same statement."""
    # the ids as the link's own strings: Postgres sorts what it writes (a uuid's canonical
    # text sorts as the uuid does, so the rows go in the order they are locked in either way)
    per_day: dict[tuple[str, date], _Counts] = defaultdict(_Counts)
    links: dict[str, LinkInfo] = {}
    visited: set[tuple[str, date, str]] = set()
    for s in events:
        link = links.setdefault(s.link.id, s.link)
        counted = counts_as_click(s, count_bots)
        day = s.at.date()
        per_day[(link.id, day)].add(s, counted)
        if counted and s.visitor_key:
            visited.add((link.id, day, s.visitor_key))
    days = []
    for (lid, day), c in per_day.items():
        link = links[lid]
        days.append(
            (
                lid,
                day,
                link.workspace_id,
                link.program_id,
                link.affiliate_id,
                c.clicks,
                c.bot_clicks,
                c.leads,
                c.conversions,
                c.last_clicked_at,
            )
        )
    fell = [(*k, n) for k, n in sorted(dropped.items())] if dropped else []
    await conn.execute(_APPLY, jsonrows.doc(list(visited)), jsonrows.doc(days), jsonrows.doc(fell))

    converted = sorted(
        {UUID(s.link.affiliate_id) for s in events if s.type is EventType.CONVERSION and s.link.affiliate_id}
    )
    if not converted:
        return []
    # The sum below reads every link of the affiliate, most of them not locked by this
    # batch: under READ COMMITTED, two batches converting on different links of one
    # affiliate would each miss the other's uncommitted conversion and neither would record
    # the threshold they cross together. With the affiliate locked first, the second batch
    # waits for the first to commit, and its sum (a new statement, a new snapshot) sees it.
    await conn.execute(_LOCK_AFFILIATES, converted)
    reached_at = max(s.at for s in events if s.type is EventType.CONVERSION)
    rows = await conn.fetch(_MILESTONES, converted, reached_at)
    return [MilestoneReached(r["affiliate_id"], r["milestone_id"], r["reached_at"]) for r in rows]
