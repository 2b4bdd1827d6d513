"""The invariants every fault scenario ends with, checked after the drain.

- I1: every event the edge answered 2xx for is stored exactly once: its marker appears once
  in ``events``; none missing, none twice.
- I2: every counter equals its event rows (the SQL is written here, independently of
  workers/consumer/counters.py and workers/ops/reconcile.py): per link clicks (non-bot), bot
  clicks, leads (each counting its quantity), conversions and last_clicked_at over events
  with test_mode and out_of_window false; unique clicks = the link's ``link_visitor_days``
  rows, which are exactly the distinct (link, UTC day, visitor key) of those clicks; the
  same per link and day in ``daily_stats``; and every milestone whose threshold an
  affiliate's conversions reached, exactly once, and no other.
- I3: nothing pending and nothing undelivered in any consumer group of any partition; the
  dead-letter stream holds exactly the planted poison (by stream and entry id), each once.

The drain is a condition, not a sleep: every group of every partition has delivered the
last entry and has nothing pending, the edge's spool is empty, and the event count did not
move between two polls.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from redis.exceptions import RedisError, ResponseError

from ingest.contract import layout
from ingest.contract.keys import Keys
from ingest.spool import store as spool_store

from ._load import MARKER_SQL
from ._sentinel import client as redis_client

# how many leads a lead row counts: its payload's quantity (Dub's eventQuantity, which the edge
# takes from 1 to 1000 and writes when it is more than 1), else 1; written here, not taken from
# workers/consumer/counters.py (LEAD_QUANTITY), so a worker that counts it wrong is seen
LEAD_COUNT = "CASE WHEN e.payload->>'quantity' ~ '^[0-9]{1,9}$' THEN (e.payload->>'quantity')::int ELSE 1 END"

# a row that does not read back whole: a name of a dictionary entry that is not there
# (schemas 16, 17, 20: entries made outside the batch's transaction, ids remembered by each
# connection), or a click whose payload, read as GET /v1/events reads it, lacks the click id
# or visitor id its columns hold (schema 20 stores them once)
_READ_BACK = """
SELECT e.event_id, e.agent_id, e.device_id, e.place_id, p->>'click_id' AS click, p->>'visitor_id' AS visitor
FROM events e, event_payload(e.payload, e.link_id, e.referrer, e.click_id, e.visitor_id) AS p
WHERE (e.agent_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_agents a WHERE a.id = e.agent_id))
   OR (e.device_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_devices d WHERE d.id = e.device_id))
   OR (e.place_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_places x WHERE x.id = e.place_id))
   OR (e.type = 1 AND e.click_id IS NOT NULL
       AND lower(p->>'click_id') IS DISTINCT FROM 'clk_' || replace(e.click_id::text, '-', ''))
   OR (e.type = 1 AND e.visitor_id IS NOT NULL AND p->>'visitor_id' IS DISTINCT FROM e.visitor_id)
ORDER BY 1 LIMIT 20
"""
# an enriched click's referrer domain as GET /v1/events reads it (derived from the referrer,
# schema 26, or the row's copy), beside the referrer: the worker's own, read_back_problems
_DOMAINS = """
SELECT e.event_id, e.referrer,
       event_enrichment(e.enrichment, e.device_id, e.place_id, e.ip, e.country, e.asn, e.is_bot, e.referrer)
           ->>'referrer_domain' AS domain
FROM events e WHERE e.device_id IS NOT NULL AND e.referrer IS NOT NULL
"""
_LINKS = f"""
WITH counted AS (
    SELECT link_id,
           count(*) FILTER (WHERE type = 1 AND NOT is_bot) AS clicks,
           count(*) FILTER (WHERE type = 1 AND is_bot) AS bot_clicks,
           coalesce(sum({LEAD_COUNT}) FILTER (WHERE type = 2), 0) AS leads,
           count(*) FILTER (WHERE type = 3) AS conversions,
           max(received_at) FILTER (WHERE type = 1 AND NOT is_bot) AS last_clicked_at
    FROM events e WHERE NOT test_mode AND NOT out_of_window GROUP BY link_id
), visits AS (SELECT link_id, count(*) AS n FROM link_visitor_days GROUP BY link_id)
SELECT l.code,
       l.clicks, coalesce(c.clicks, 0) AS want_clicks,
       l.bot_clicks, coalesce(c.bot_clicks, 0) AS want_bot_clicks,
       l.leads, coalesce(c.leads, 0) AS want_leads,
       l.conversions, coalesce(c.conversions, 0) AS want_conversions,
       l.unique_clicks, coalesce(v.n, 0) AS want_unique_clicks,
       l.last_clicked_at, c.last_clicked_at AS want_last_clicked_at
FROM links l LEFT JOIN counted c ON c.link_id = l.id LEFT JOIN visits v ON v.link_id = l.id
WHERE (l.clicks, l.bot_clicks, l.leads, l.conversions, l.unique_clicks, l.last_clicked_at)
      IS DISTINCT FROM (coalesce(c.clicks, 0), coalesce(c.bot_clicks, 0), coalesce(c.leads, 0),
                        coalesce(c.conversions, 0), coalesce(v.n, 0), c.last_clicked_at)
ORDER BY l.code
"""

_VISITS = """
WITH clicks AS (
    SELECT DISTINCT link_id, (received_at AT TIME ZONE 'UTC')::date AS day, visitor_key
    FROM events
    WHERE type = 1 AND NOT is_bot AND NOT test_mode AND NOT out_of_window AND visitor_key IS NOT NULL
)
(SELECT 'not in link_visitor_days' AS problem, * FROM clicks
 EXCEPT SELECT 'not in link_visitor_days', link_id, day, visitor_key FROM link_visitor_days)
UNION ALL
(SELECT 'no such click' AS problem, link_id, day, visitor_key FROM link_visitor_days
 EXCEPT SELECT 'no such click', * FROM clicks)
LIMIT 20
"""

_DAILY = f"""
WITH counted AS (
    SELECT link_id, (received_at AT TIME ZONE 'UTC')::date AS day,
           count(*) FILTER (WHERE type = 1 AND NOT is_bot) AS clicks,
           count(*) FILTER (WHERE type = 1 AND is_bot) AS bot_clicks,
           coalesce(sum({LEAD_COUNT}) FILTER (WHERE type = 2), 0) AS leads,
           count(*) FILTER (WHERE type = 3) AS conversions
    FROM events e WHERE NOT test_mode AND NOT out_of_window GROUP BY 1, 2
), visits AS (SELECT link_id, day, count(*) AS n FROM link_visitor_days GROUP BY 1, 2)
SELECT link_id, day,
       (s.clicks, s.bot_clicks, s.leads, s.conversions, s.unique_clicks)::text AS stored,
       (c.clicks, c.bot_clicks, c.leads, c.conversions, v.n)::text AS from_events
FROM counted c FULL JOIN daily_stats s USING (link_id, day) LEFT JOIN visits v USING (link_id, day)
WHERE (coalesce(s.clicks, 0), coalesce(s.bot_clicks, 0), coalesce(s.leads, 0), coalesce(s.conversions, 0),
       coalesce(s.unique_clicks, 0))
      IS DISTINCT FROM (coalesce(c.clicks, 0), coalesce(c.bot_clicks, 0), coalesce(c.leads, 0),
                        coalesce(c.conversions, 0), coalesce(v.n, 0))
LIMIT 20
"""

# sales, revenue and their refunds per link (nil: unattributed), UTC day and currency of the
# sale, from the sale and refund rows
_SALES = """
WITH refunded AS (
    SELECT sale_id, count(*) AS n, sum(amount) AS total FROM refunds GROUP BY 1
), counted AS (
    SELECT coalesce(s.link_id, '00000000-0000-0000-0000-000000000000'::uuid) AS link_id,
           (s.received_at AT TIME ZONE 'UTC')::date AS day, s.currency, count(*) AS n, sum(s.amount) AS total,
           coalesce(sum(r.n), 0) AS refunds, coalesce(sum(r.total), 0) AS refunded
    FROM sales s LEFT JOIN refunded r ON r.sale_id = s.event_id GROUP BY 1, 2, 3
), stored AS (
    SELECT link_id, day, currency, sum(sales) AS n, sum(amount) AS total, sum(refunds) AS refunds,
           sum(refunded) AS refunded
    FROM sale_stats GROUP BY 1, 2, 3
)
SELECT link_id, day, currency, (s.n, s.total, s.refunds, s.refunded)::text AS stored,
       (c.n, c.total, c.refunds, c.refunded)::text AS from_rows
FROM counted c FULL JOIN stored s USING (link_id, day, currency)
WHERE (coalesce(s.n, 0), coalesce(s.total, 0), coalesce(s.refunds, 0), coalesce(s.refunded, 0))
      IS DISTINCT FROM (coalesce(c.n, 0), coalesce(c.total, 0), coalesce(c.refunds, 0), coalesce(c.refunded, 0))
LIMIT 20
"""
# each sale's running refund totals against its refund rows, and never past its amount
_REFUNDED = """
SELECT s.event_id, s.amount, s.refunds, s.refunded, count(r.id) AS rows_n, coalesce(sum(r.amount), 0) AS rows_total
FROM sales s LEFT JOIN refunds r ON r.sale_id = s.event_id
GROUP BY s.event_id, s.amount, s.refunds, s.refunded
HAVING (s.refunds, s.refunded) IS DISTINCT FROM (count(r.id), coalesce(sum(r.amount), 0))
    OR coalesce(sum(r.amount), 0) > s.amount
LIMIT 20
"""


def _owed(v: tuple[int, str] | None) -> str:
    return "nothing" if v is None else f"({v[0]},{v[1]})"


MILESTONES = """
WITH conv AS (
    SELECT l.affiliate_id, count(*) AS n
    FROM events e JOIN links l ON l.id = e.link_id
    WHERE e.type = 3 AND NOT e.test_mode AND NOT e.out_of_window AND l.affiliate_id IS NOT NULL
    GROUP BY 1
), want AS (
    SELECT a.id AS affiliate_id, m.id AS milestone_id
    FROM conv JOIN affiliates a ON a.id = conv.affiliate_id
    JOIN milestones m ON m.program_id = a.program_id AND m.threshold <= conv.n
), have AS (SELECT affiliate_id, milestone_id FROM affiliate_milestones)
SELECT 'missing' AS problem, w.affiliate_id, m.threshold, c.n AS conversions
FROM (SELECT * FROM want EXCEPT SELECT * FROM have) w
JOIN milestones m ON m.id = w.milestone_id JOIN conv c ON c.affiliate_id = w.affiliate_id
UNION ALL
SELECT 'not reached', h.affiliate_id, m.threshold, coalesce(c.n, 0)
FROM (SELECT * FROM have EXCEPT SELECT * FROM want) h
JOIN milestones m ON m.id = h.milestone_id LEFT JOIN conv c ON c.affiliate_id = h.affiliate_id
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _sid(v: Any) -> tuple[int, int]:
    ms, _, seq = _s(v).partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Figures:
    scenario: str
    accepted: int = 0
    stored: int = 0
    dead: int = 0
    duplicates: int = 0
    recover_s: float | None = None
    missing: int = 0
    extras: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self, mode: str) -> str:
        recover = "never" if self.recover_s is None else f"{self.recover_s:.1f}"
        return (
            f"FAULTS[{mode}] {self.scenario}: accepted={self.accepted} stored={self.stored}"
            f" dead-lettered={self.dead} duplicates={self.duplicates} recover_s={recover}"
            f" (missing={self.missing} refused={self.refused} stored-but-not-accepted={self.extras})"
        )


class Checker:
    """Reads Postgres (a fresh session per look: the server may have restarted) and Redis."""

    def __init__(
        self, database_url: str, redis_url: str, keys: Keys, spool_dir: Path, *, cluster: bool = False
    ) -> None:
        self.database_url = database_url
        self.redis = redis_client(redis_url, timeout=5, cluster=cluster)  # a sentinel URL: the current primary
        self.keys = keys
        self.spool_dir = spool_dir

    async def close(self) -> None:
        await self.redis.aclose()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    def shard_urls(self) -> dict[str, str]:
        """Every shard's database by name (one here: the generative test's checker has more)."""
        return {"default": self.database_url}

    async def fetch_raw(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """``sql`` over every row there is, on every shard (``fetch``, here)."""
        return await self.fetch(sql, *args)

    async def ledger_history(
        self, workspace_id: str | None = None
    ) -> tuple[dict[Any, Any], list[Any], list[Any], list[Any]]:
        """``workers.ops.ledger_check.history`` in one snapshot: rules, leads, sales, ledger rows."""
        from workers.ops.ledger_check import history

        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await history(conn, workspace_id)
        finally:
            await conn.close()

    async def event_count(self) -> int:
        return int(await self.fetchval("SELECT count(*) FROM events"))

    async def unsettled(self, groups: set[str] | None = None) -> list[str]:
        """What still keeps the pipeline from being drained (empty when drained)."""
        left: list[str] = []
        lay = await layout.load(self.redis, self.keys, self.keys.partitions)
        for p in range(max(lay.high, self.keys.partitions)):  # every partition there ever was
            stream = self.keys.stream(p)
            try:
                info = await self.redis.xinfo_stream(stream)
                found = await self.redis.xinfo_groups(stream)
            except ResponseError as exc:
                if "no such key" in str(exc):
                    continue  # nothing ever appended to this partition, or retired
                raise
            last = _sid(info["last-generated-id"])
            if p >= lay.span and info["length"]:
                left.append(f"{stream}: {info['length']} entries in a partition the workers no longer read")
            if last > (0, 0) and not any(_s(g["name"]) == "workers" for g in found):
                left.append(f"{stream}: entries, and no workers group to read them")
            for g in found:
                name = _s(g["name"])
                if groups is not None and name not in groups:
                    continue
                if g["pending"]:
                    left.append(f"{stream} group {name}: {g['pending']} pending")
                if _sid(g["last-delivered-id"]) < last:
                    left.append(
                        f"{stream} group {name}: undelivered entries (last delivered "
                        f"{_s(g['last-delivered-id'])} < {_s(info['last-generated-id'])})"
                    )
        if spooled := self.spooled():
            left.append(f"edge spool: {spooled} entries not drained")
        left += await self.waiting()
        return left

    async def waiting(self) -> list[str]:
        """The workspaces' waiting rooms (``workers.consumer.waiting``) still named, or
        still there: events a shard has yet to take."""
        left = []
        if named := await self.redis.scard(self.keys.waiting_rooms):
            left.append(f"{named} waiting rooms named in {self.keys.waiting_rooms}")
        async for room in self.redis.scan_iter(match=self.keys.waiting_room("*"), count=1000):
            left.append(f"waiting room {_s(room)}: {await self.redis.xlen(room)} entries")
        return left

    def spooled(self) -> int:
        """Events waiting in the edge's spool (its totals row, read-only); a spool that
        cannot be read is never taken for an empty one."""
        u = spool_store.usage(self.spool_dir)
        return max(u.entries, 1) if (u.error or "").startswith("unreadable") else u.entries

    async def pending(self) -> int:
        """Entries read and not acked, over every partition of the workers' group."""
        total = 0
        lay = await layout.load(self.redis, self.keys, self.keys.partitions)
        for stream in [self.keys.stream(p) for p in range(lay.span)]:
            try:
                total += int((await self.redis.xpending(stream, "workers"))["pending"])
            except ResponseError:
                continue
        return total

    async def last_ids(self) -> dict[str, tuple[int, int]]:
        """The last entry id appended to each partition, now."""
        out: dict[str, tuple[int, int]] = {}
        for stream in self.keys.streams:
            try:
                out[stream] = _sid((await self.redis.xinfo_stream(stream))["last-generated-id"])
            except ResponseError as exc:
                if "no such key" not in str(exc):
                    raise
        return out

    async def behind(self, target: dict[str, tuple[int, int]]) -> list[str]:
        """What the workers' group has not yet acked of the entries up to ``target``."""
        left: list[str] = []
        for stream, last in target.items():
            if last == (0, 0):
                continue
            group = next((g for g in await self.redis.xinfo_groups(stream) if _s(g["name"]) == "workers"), None)
            if group is None:
                left.append(f"{stream}: no workers group")
            elif _sid(group["last-delivered-id"]) < last:
                left.append(f"{stream}: not yet delivered up to {last}")
            elif group["pending"]:
                oldest = (await self.redis.xpending(stream, "workers"))["min"]  # None: acked meanwhile
                if oldest is not None and _sid(oldest) <= last:
                    left.append(f"{stream}: entries up to {last} still pending")
        return left

    async def wait_caught_up(
        self, since: float, target: dict[str, tuple[int, int]], timeout: float
    ) -> tuple[float | None, list[str]]:
        """Seconds from ``since`` (the fault's end) until every entry appended before it is
        acked (so committed) and the edge's spool is empty; the load may go on meanwhile.
        Entries the spool appends later are waited for too. None on timeout."""
        deadline = time.monotonic() + timeout
        want: dict[str, tuple[int, int]] | None = target
        left: list[str] = ["not looked yet"]
        while time.monotonic() < deadline:
            try:
                if self.spooled():
                    want, left = None, ["edge spool not drained"]
                else:
                    if want is None:  # the spool just drained into the streams: up to here too
                        want = await self.last_ids()
                    left = await self.behind(want)
                if not left:
                    return time.monotonic() - since, []
            except (TimeoutError, OSError, RedisError) as exc:
                left = [f"redis unreachable: {exc!r}"]
            await asyncio.sleep(0.1)
        return None, left

    async def wait_drained(self, since: float, timeout: float) -> tuple[float | None, list[str]]:
        """Seconds from ``since`` until drained and the event count stable; None on timeout,
        with what was left."""
        deadline = time.monotonic() + timeout
        seen: tuple[float, int] | None = None  # (when first settled, event count then)
        left: list[str] = ["not looked yet"]
        while time.monotonic() < deadline:
            try:
                left = await self.unsettled()
                count = await self.event_count() if not left else -1
            except (TimeoutError, OSError, RedisError, asyncpg.PostgresError) as exc:
                left, count = [f"unreachable: {exc!r}"], -1
            if not left:
                if seen is not None and seen[1] == count:
                    return seen[0] - since, []
                seen = (time.monotonic(), count)
            else:
                seen = None
            await asyncio.sleep(0.25)
        return None, left

    async def dead_letters(self) -> list[tuple[str, str, str]]:
        """(stream, entry id, error) of every dead letter."""
        out = []
        for _, fields in await self.redis.xrange(self.keys.dead):
            out.append((_s(fields.get(b"stream", b"?")), _s(fields.get(b"id", b"?")), _s(fields.get(b"error", b""))))
        return out

    async def milestone_problems(self) -> list[str]:
        return [
            f"milestone {r['problem']}: affiliate {r['affiliate_id']} threshold {r['threshold']}"
            f" with {r['conversions']} conversions"
            for r in await self.fetch(MILESTONES)
        ]

    async def read_back_problems(self) -> list[str]:
        """Every row (20 at most) that does not read back whole (``_READ_BACK``), and every
        enriched click whose referrer domain does not read back as the worker's (20 at
        most), each a sentence."""
        from workers.consumer.enrich import _referrer_domain

        out = [f"event {r['event_id']} does not read back whole: {dict(r)}" for r in await self.fetch(_READ_BACK)]
        wrong = [r for r in await self.fetch(_DOMAINS) if r["domain"] != _referrer_domain(r["referrer"])]
        return out + [
            f"event {r['event_id']} reads referrer domain {r['domain']!r} from {r['referrer']!r}" for r in wrong[:20]
        ]

    async def counter_problems(self) -> list[str]:
        """I2: every counter that differs from what its event rows say, each a sentence."""
        p: list[str] = []
        for r in await self.fetch(_LINKS):
            diff = {
                c: (r[c], r[f"want_{c}"])
                for c in ("clicks", "bot_clicks", "leads", "conversions", "unique_clicks", "last_clicked_at")
                if r[c] != r[f"want_{c}"]
            }
            p.append(f"I2: link {r['code']} counters (stored, from events): {diff}")
        for r in await self.fetch(_VISITS):
            p.append(f"I2: link_visitor_days {r['problem']}: {r['link_id']} {r['day']} {r['visitor_key']}")
        for r in await self.fetch(_DAILY):
            p.append(f"I2: daily_stats {r['link_id']} {r['day']}: stored {r['stored']}, from events {r['from_events']}")
        for r in await self.fetch(_SALES):
            p.append(
                f"I2: sale_stats {r['link_id']} {r['day']} {r['currency']}: stored {r['stored']}, from sales"
                f" {r['from_rows']}"
            )
        for r in await self.fetch(_REFUNDED):
            p.append(
                f"I2: sale {r['event_id']} of {r['amount']}: refunds {r['refunds']}/{r['refunded']} stored,"
                f" {r['rows_n']}/{r['rows_total']} in its refund rows"
            )
        if wrong := await self.milestone_problems():
            p.append(f"I2: {len(wrong)} milestones wrong, e.g. {wrong[:3]}")
        return p

    async def ledger_problems(
        self,
        bps: int,
        flat: int | dict[str, int],
        lead_flat: int,
        lead_currency: str,
        *,
        import_earns: bool = True,
        skip: AbstractSet[str] = frozenset(),
    ) -> list[str]:
        """The commission ledger against its rules (lifetime, every program alike), each sale
        or lead whose net standing differs a sentence: the rules applied to the whole history
        by ``ingest.contract.earnings`` (the generative run imports with ``--commissions``).
        ``skip``: programs whose rules changed over the history (the caller judges them)."""
        from ingest.contract import earnings
        from ingest.contract.commission import Rules

        given = {"sale_bps": bps, "sale_flat": flat, "lead_flat": lead_flat, "lead_currency": lead_currency}
        stored, leads, sales, rows = await self.ledger_history()
        rules = {program: Rules.from_json(given) for program in stored}
        if skip:
            theirs = {x.event_id for x in leads if x.program_id in skip}
            theirs |= {x.event_id for x in sales if x.program_id in skip}
            leads = [x for x in leads if x.event_id not in theirs]
            sales = [x for x in sales if x.event_id not in theirs]
            rows = [r for r in rows if (r.sale_id if r.kind == "clawback" else r.source_id) not in theirs]
        want = earnings.expected(rules, leads, sales, import_earns=import_earns)
        return [
            f"ledger: {k[0]} {k[1]}: stored {_owed(s)}, by the rules {_owed(x)}"
            for k, x, s in earnings.differences(want, earnings.standing(rows))
        ]

    async def missing(self, accepted: dict[str, str]) -> set[str]:
        """The accepted markers no event row carries."""
        stored = {r["marker"] for r in await self.fetch(f"SELECT DISTINCT {MARKER_SQL} AS marker FROM events e")}
        return set(accepted) - stored

    async def verify(
        self,
        figures: Figures,
        accepted: dict[str, str],
        *,
        planted_dead: AbstractSet[tuple[str, str]] = frozenset(),
    ) -> Figures:
        """Check I1-I3; every violation is added to ``figures.problems`` (not raised)."""
        p = figures.problems
        figures.accepted = len(accepted)

        # I1: exactly once
        counts = Counter(
            {
                r["marker"]: r["n"]
                for r in await self.fetch(f"SELECT {MARKER_SQL} AS marker, count(*) AS n FROM events e GROUP BY 1")
            }
        )
        missing = [m for m in accepted if m not in counts]
        twice = {m: n for m, n in counts.items() if n > 1}
        figures.stored = sum(1 for m in accepted if m in counts)
        figures.missing = len(missing)
        figures.duplicates = sum(n - 1 for n in twice.values())
        figures.extras = sum(1 for m in counts if m not in accepted)
        if missing:
            kinds = Counter(accepted[m] for m in missing)
            p.append(f"I1: {len(missing)} accepted events not stored ({dict(kinds)}), e.g. {missing[:3]}")
        if twice:
            p.append(f"I1: {len(twice)} events stored more than once, e.g. {list(twice.items())[:3]}")

        # I2: counters equal their event rows
        p.extend(await self.counter_problems())

        # I3: nothing pending, nothing undelivered; only the planted poison dead-lettered, once each
        p.extend(f"I3: {x}" for x in await self.unsettled())
        dead = await self.dead_letters()
        figures.dead = len(dead)
        where = Counter((s, i) for s, i, _ in dead)
        unexpected = [(s, i, e) for s, i, e in dead if (s, i) not in planted_dead]
        if unexpected:
            errors = Counter(e.split(":")[0][:60] for _, _, e in unexpected)
            p.append(
                f"I3: {len(unexpected)} dead letters that are not planted poison, errors {dict(errors)},"
                f" e.g. {unexpected[:2]}"
            )
        if not_dead := planted_dead - set(where):
            p.append(f"I3: {len(not_dead)} planted poison entries not dead-lettered, e.g. {sorted(not_dead)[:3]}")
        if twice_dead := [k for k, n in where.items() if n > 1]:
            p.append(f"I3: {len(twice_dead)} entries dead-lettered more than once, e.g. {twice_dead[:3]}")
        return figures
