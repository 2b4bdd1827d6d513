"""Counters, moved only from a batch's newly inserted (non-test) events, in its transaction.

Per link: clicks, unique clicks, bot clicks, leads, conversions, last_clicked_at; per link
and UTC day the same in ``daily_stats`` (per affiliate and program by GROUP BY). A bot's
click always counts in bot clicks; as a click too (unique clicks and last_clicked_at
included) only when its workspace's ``bot_policy`` is ``count``, else never (``exclude``,
the default). Aggregated per link per batch: one
UPDATE row per link however viral, locks taken in link-id order. Milestones (seed 001's
"refer 5 friends") are reached from the new conversion totals, each once.

Lock order, the same in every batch so that none waits in a circle: event_dedupe, then
events (see store),
link_visitor_days in key order, links in id order, daily_stats in key order, then the
converting affiliates in id order and their milestone rows in key order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows, plans
from ingest.contract.events import EventType
from ingest.contract.links import LinkInfo
from workers.consumer.stored import Stored

# NO KEY UPDATE: the foreign-key checks of customer, link and milestone rows (KEY SHARE) pass
# (one plan, whatever the ids: ``ingest.contract.plans``)
_LOCK_AFFILIATES = f"SELECT 1 FROM affiliates WHERE id = {plans.any_of(1, 'uuid')} ORDER BY id FOR NO KEY UPDATE"

# a set, not a counter: the rows that come back are the visitor's first click that day
_UNIQUE = f"""
INSERT INTO link_visitor_days (link_id, day, visitor_key)
{jsonrows.select(("uuid", "date", "text"))} ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
RETURNING link_id, day
"""

_LINK_DELTAS = jsonrows.table(
    ("uuid", "bigint", "bigint", "bigint", "bigint", "bigint", "timestamptz"),
    "d(id, clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at)",
)
# One statement that locks, then updates. The CTE's locking clause sits above its sort, so
# the rows are locked in id order as the UPDATE pulls them, whatever the plan: a row is
# updated only once the CTE has returned it, and by then every lower id is locked. (An
# UPDATE ... FROM alone locks in the join's order, which no one controls.) A row that a
# concurrent batch changed is locked in its newest version and the UPDATE recomputes its
# sums from that version (READ COMMITTED's recheck), as two statements did.
_UPDATE_LINKS = f"""
WITH locked AS MATERIALIZED (
    SELECT id FROM links WHERE id IN (SELECT d.id FROM {_LINK_DELTAS}) ORDER BY id FOR NO KEY UPDATE
)
UPDATE links l
SET clicks = l.clicks + d.clicks,
    unique_clicks = l.unique_clicks + d.unique_clicks,
    bot_clicks = l.bot_clicks + d.bot_clicks,
    leads = l.leads + d.leads,
    conversions = l.conversions + d.conversions,
    last_clicked_at = GREATEST(l.last_clicked_at, d.last_clicked_at),
    updated_at = now()
FROM locked k, {_LINK_DELTAS}
WHERE l.id = k.id AND d.id = k.id
"""

_UPSERT_DAILY = f"""
INSERT INTO daily_stats AS s (link_id, day, workspace_id, program_id, affiliate_id,
                              clicks, unique_clicks, bot_clicks, leads, conversions)
{jsonrows.select(("uuid", "date", "uuid", "uuid", "uuid", "bigint", "bigint", "bigint", "bigint", "bigint"))}
ORDER BY 1, 2
ON CONFLICT (link_id, day) DO UPDATE
SET clicks = s.clicks + EXCLUDED.clicks,
    unique_clicks = s.unique_clicks + EXCLUDED.unique_clicks,
    bot_clicks = s.bot_clicks + EXCLUDED.bot_clicks,
    leads = s.leads + EXCLUDED.leads,
    conversions = s.conversions + EXCLUDED.conversions
"""

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


@dataclass(slots=True)
class _Counts:
    clicks: int = 0
    unique_clicks: int = 0
    bot_clicks: int = 0
    leads: int = 0
    conversions: int = 0
    last_clicked_at: datetime | None = None

    def counts(self) -> tuple[int, int, int, int, int]:
        return self.clicks, self.unique_clicks, self.bot_clicks, self.leads, self.conversions

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
            self.leads += 1
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
    conn: asyncpg.Connection, events: list[Stored], *, count_bots: Collection[str] = ()
) -> list[MilestoneReached]:
    per_link: dict[UUID, _Counts] = defaultdict(_Counts)
    per_day: dict[tuple[UUID, date], _Counts] = defaultdict(_Counts)
    links: dict[UUID, LinkInfo] = {}
    uuids: dict[str, UUID] = {}  # a link's id parsed once a batch, not once an event
    visited: set[tuple[UUID, date, str]] = set()
    for s in events:
        lid = uuids.get(s.link.id)
        if lid is None:
            lid = uuids[s.link.id] = UUID(s.link.id)
            links[lid] = s.link
        counted = counts_as_click(s, count_bots)
        day = s.at.date()
        per_link[lid].add(s, counted)
        per_day[(lid, day)].add(s, counted)
        if counted and s.visitor_key:
            visited.add((lid, day, s.visitor_key))

    visits = sorted(visited)
    if visits:
        for r in await conn.fetch(_UNIQUE, jsonrows.doc(visits)):
            per_link[r["link_id"]].unique_clicks += 1
            per_day[(r["link_id"], r["day"])].unique_clicks += 1

    ids = sorted(per_link)
    await conn.execute(
        _UPDATE_LINKS,
        jsonrows.doc([(i, *per_link[i].counts(), per_link[i].last_clicked_at) for i in ids]),
    )
    days = sorted(per_day)
    await conn.execute(
        _UPSERT_DAILY,
        jsonrows.doc(
            [
                (
                    lid,
                    day,
                    links[lid].workspace_id,
                    links[lid].program_id,
                    links[lid].affiliate_id,
                    *per_day[(lid, day)].counts(),
                )
                for lid, day in days
            ]
        ),
    )

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
