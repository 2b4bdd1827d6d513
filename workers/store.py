"""One Postgres transaction per batch: events in, counters moved, exactly once in effect.

The event rows are inserted with ON CONFLICT DO NOTHING RETURNING, and counters move only
from the rows that came back: a redelivered, reclaimed or replayed entry inserts nothing
and so moves nothing. Every write is set-based (unnest), one statement per table, and
sorted (events by event_id, counters by link id) so that concurrent batches take row
locks in the same order and cannot deadlock one another.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest import clicks
from ingest.events import Envelope, EventType
from ingest.links import LINK_SELECT, LinkInfo

from .errors import is_retryable_in_place

log = structlog.get_logger("workers.store")

_RESOLVE_LINKS = LINK_SELECT + " WHERE l.code = ANY($1::text[])"

_INSERT_EVENTS = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, affiliate_id, click_id, visitor_id,
                    customer_external_id, name, dedupe_key, dialect, test_mode, received_at, ip, user_agent,
                    referrer, payload)
SELECT * FROM unnest($1::uuid[], $2::smallint[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[], $7::uuid[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::boolean[],
                     $14::timestamptz[], $15::inet[], $16::text[], $17::text[], $18::jsonb[])
ORDER BY 1
-- no conflict target: the event id and the dedupe key (one lead per customer and event
-- name, one conversion per code and session) both make a repeat a no-op
ON CONFLICT DO NOTHING
RETURNING event_id
"""

# first-touch attribution comes from the earliest event, contact details from the latest,
# status only rises: the same customer whatever order the events are processed in
_UPSERT_CUSTOMERS = """
INSERT INTO customers AS c (workspace_id, visitor_id, link_id, affiliate_id, program_id, first_click_id,
                            external_id, email, name, avatar_url, status, first_seen_at, last_seen_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::smallint[],
                     $12::timestamptz[], $13::timestamptz[])
ORDER BY 1, 2
ON CONFLICT (workspace_id, visitor_id) DO UPDATE SET
    link_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at THEN EXCLUDED.link_id ELSE c.link_id END,
    affiliate_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at
                        THEN EXCLUDED.affiliate_id ELSE c.affiliate_id END,
    program_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at THEN EXCLUDED.program_id ELSE c.program_id END,
    first_click_id = CASE WHEN c.first_click_id IS NULL
                            OR (EXCLUDED.first_click_id IS NOT NULL AND EXCLUDED.first_seen_at < c.first_seen_at)
                          THEN EXCLUDED.first_click_id ELSE c.first_click_id END,
    external_id = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at
                       THEN coalesce(EXCLUDED.external_id, c.external_id)
                       ELSE coalesce(c.external_id, EXCLUDED.external_id) END,
    email = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.email, c.email)
                 ELSE coalesce(c.email, EXCLUDED.email) END,
    name = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.name, c.name)
                ELSE coalesce(c.name, EXCLUDED.name) END,
    avatar_url = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.avatar_url, c.avatar_url)
                      ELSE coalesce(c.avatar_url, EXCLUDED.avatar_url) END,
    status = GREATEST(c.status, EXCLUDED.status),
    first_seen_at = LEAST(c.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(c.last_seen_at, EXCLUDED.last_seen_at)
"""

# lock the links in id order first: an UPDATE ... FROM takes its row locks in whatever
# order the join produces, which two batches need not agree on
_LOCK_LINKS = "SELECT 1 FROM links WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE"

_UPDATE_LINKS = """
UPDATE links l
SET clicks = l.clicks + d.clicks,
    leads = l.leads + d.leads,
    conversions = l.conversions + d.conversions,
    last_clicked_at = GREATEST(l.last_clicked_at, d.last_clicked_at),
    updated_at = now()
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[])
     AS d(id, clicks, leads, conversions, last_clicked_at)
WHERE l.id = d.id
"""

_UPSERT_DAILY = """
INSERT INTO daily_stats (link_id, day, workspace_id, program_id, affiliate_id, clicks, leads, conversions)
SELECT * FROM unnest($1::uuid[], $2::date[], $3::uuid[], $4::uuid[], $5::uuid[],
                     $6::bigint[], $7::bigint[], $8::bigint[])
ORDER BY 1, 2
ON CONFLICT (link_id, day) DO UPDATE
SET clicks = daily_stats.clicks + EXCLUDED.clicks,
    leads = daily_stats.leads + EXCLUDED.leads,
    conversions = daily_stats.conversions + EXCLUDED.conversions
"""

_IN_PLACE_RETRIES = 5


@dataclass(slots=True)
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    unknown_codes: list[str] = field(default_factory=list)
    inactive_codes: list[str] = field(default_factory=list)
    links_found: list[LinkInfo] = field(default_factory=list)


@dataclass(slots=True)
class _Counts:
    clicks: int = 0
    leads: int = 0
    conversions: int = 0
    last_clicked_at: datetime | None = None


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _inet(ip: str | None) -> str | None:
    # the edge sends what the socket said; anything else is not stored rather than failing
    if ip is None:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


async def write_batch(pool: asyncpg.Pool, envelopes: list[Envelope]) -> BatchResult:
    """Store a batch in one transaction; deadlocks and serialization failures retried."""
    for attempt in range(1, _IN_PLACE_RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await _write(conn, envelopes)
        except Exception as exc:
            if not is_retryable_in_place(exc) or attempt == _IN_PLACE_RETRIES:
                raise
            log.warning("batch.retry", attempt=attempt, error=type(exc).__name__)
            await asyncio.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def _opt(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _dedupe_key(e: Envelope) -> str | None:
    if e.type is EventType.LEAD and isinstance(e.payload.get("external_id"), str):
        return f"lead\x1f{e.payload['external_id']}\x1f{e.payload.get('name') or ''}"
    if e.type is EventType.CONVERSION:
        return _opt(e.payload.get("dedupe"))
    return None


async def _write(conn: asyncpg.Connection, envelopes: list[Envelope]) -> BatchResult:
    result = BatchResult()
    codes = sorted({c for e in envelopes if isinstance(c := e.payload.get("code"), str)})
    by_code = {r["code"]: LinkInfo.from_record(r) for r in await conn.fetch(_RESOLVE_LINKS, codes)}
    result.links_found = list(by_code.values())

    cols: tuple[list[Any], ...] = tuple([] for _ in range(18))
    kept: dict[UUID, tuple[Envelope, LinkInfo]] = {}
    for e in sorted(envelopes, key=lambda e: e.event_id):
        code = e.payload.get("code")
        link = by_code.get(code) if isinstance(code, str) else None
        if link is None or (e.workspace_id is not None and e.workspace_id != link.workspace_id):
            result.unknown_codes.append(str(code))
            continue
        if e.type is EventType.CLICK and not link.active:
            result.inactive_codes.append(link.code)
            continue
        click_id = e.payload.get("click_id")
        row = (
            e.event_id,
            int(e.type),
            link.workspace_id,
            link.id,
            link.program_id,
            link.affiliate_id,
            clicks.parse(click_id) if isinstance(click_id, str) else None,
            _opt(e.payload.get("visitor_id")),
            _opt(e.payload.get("external_id")),
            _opt(e.payload.get("name")),
            _dedupe_key(e),
            e.dialect,
            e.payload.get("test_mode") is True,
            _ts(e.received_at_ms),
            _inet(e.ip),
            e.user_agent,
            _opt(e.payload.get("referrer")),
            e.payload,
        )
        for col, v in zip(cols, row, strict=True):
            col.append(v)
        kept[e.event_id] = (e, link)

    inserted = [kept[r["event_id"]] for r in await conn.fetch(_INSERT_EVENTS, *cols)] if kept else []
    result.inserted = len(inserted)
    result.duplicates = len(kept) - len(inserted)
    # test-mode events are stored, and that is all: no counter, no customer, no attribution
    live = [(e, link) for e, link in inserted if e.payload.get("test_mode") is not True]
    if live:
        await _move_counters(conn, live)
        await _upsert_customers(conn, live)
    return result


async def _upsert_customers(conn: asyncpg.Connection, events: list[tuple[Envelope, LinkInfo]]) -> None:
    """One row per (workspace, visitor): the batch merged first, since one INSERT may not
    touch a row twice."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for e, link in sorted(events, key=lambda item: item[0].received_at_ms):
        visitor = _opt(e.payload.get("visitor_id"))
        if visitor is None:
            continue  # seed 000 clicks carry no visitor: they count, they make no customer
        at = _ts(e.received_at_ms)
        c = merged.setdefault(
            (link.workspace_id, visitor),
            {"link": link, "first_click": None, "status": 0, "first": at, "last": at,
             "external_id": None, "email": None, "name": None, "avatar": None},
        )  # fmt: skip
        c["last"] = at
        c["status"] = max(c["status"], int(e.type))
        if e.type is EventType.CLICK and c["first_click"] is None:
            c["first_click"] = e.event_id
        for attr, key in (("external_id", "external_id"), ("email", "email"), ("name", "customer_name"),
                          ("avatar", "avatar")):  # fmt: skip
            if (value := _opt(e.payload.get(key))) is not None:
                c[attr] = value
    if not merged:
        return
    rows = [merged[k] for k in sorted(merged)]
    await conn.execute(
        _UPSERT_CUSTOMERS,
        [k[0] for k in sorted(merged)],
        [k[1] for k in sorted(merged)],
        [r["link"].id for r in rows],
        [r["link"].affiliate_id for r in rows],
        [r["link"].program_id for r in rows],
        [r["first_click"] for r in rows],
        [r["external_id"] for r in rows],
        [r["email"] for r in rows],
        [r["name"] for r in rows],
        [r["avatar"] for r in rows],
        [r["status"] for r in rows],
        [r["first"] for r in rows],
        [r["last"] for r in rows],
    )


async def _move_counters(conn: asyncpg.Connection, events: list[tuple[Envelope, LinkInfo]]) -> None:
    """Aggregate per link (one UPDATE row per link, however viral) and per link and day."""
    per_link: dict[UUID, _Counts] = defaultdict(_Counts)
    per_day: dict[tuple[UUID, date], _Counts] = defaultdict(_Counts)
    links = {UUID(link.id): link for _, link in events}
    for e, link in events:
        kind, at, lid = e.type, _ts(e.received_at_ms), UUID(link.id)
        for c in (per_link[lid], per_day[(lid, at.date())]):
            if kind is EventType.CLICK:
                c.clicks += 1
                if c.last_clicked_at is None or at > c.last_clicked_at:
                    c.last_clicked_at = at
            elif kind is EventType.LEAD:
                c.leads += 1
            else:
                c.conversions += 1

    ids = sorted(per_link)
    await conn.execute(_LOCK_LINKS, ids)
    await conn.execute(
        _UPDATE_LINKS,
        ids,
        [per_link[i].clicks for i in ids],
        [per_link[i].leads for i in ids],
        [per_link[i].conversions for i in ids],
        [per_link[i].last_clicked_at for i in ids],
    )
    days = sorted(per_day)
    await conn.execute(
        _UPSERT_DAILY,
        [d[0] for d in days],
        [d[1] for d in days],
        [links[d[0]].workspace_id for d in days],
        [links[d[0]].program_id for d in days],
        [links[d[0]].affiliate_id for d in days],
        [per_day[d].clicks for d in days],
        [per_day[d].leads for d in days],
        [per_day[d].conversions for d in days],
    )
