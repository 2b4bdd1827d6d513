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

from ingest.events import Envelope, EventType
from ingest.links import LinkInfo

from .errors import is_retryable_in_place

log = structlog.get_logger("workers.store")

_RESOLVE_LINKS = """
SELECT id, workspace_id, program_id, affiliate_id, code, url, domain, status
FROM links WHERE code = ANY($1::text[])
"""

_INSERT_EVENTS = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, affiliate_id,
                    dialect, received_at, ip, user_agent, referrer, payload)
SELECT * FROM unnest($1::uuid[], $2::smallint[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[],
                     $7::text[], $8::timestamptz[], $9::inet[], $10::text[], $11::text[], $12::jsonb[])
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id, type, link_id, received_at
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


async def _write(conn: asyncpg.Connection, envelopes: list[Envelope]) -> BatchResult:
    result = BatchResult()
    codes = sorted({c for e in envelopes if isinstance(c := e.payload.get("code"), str)})
    by_code = {r["code"]: LinkInfo.from_record(r) for r in await conn.fetch(_RESOLVE_LINKS, codes)}
    result.links_found = list(by_code.values())

    cols: tuple[list[Any], ...] = tuple([] for _ in range(12))
    for e in sorted(envelopes, key=lambda e: e.event_id):
        code = e.payload.get("code")
        link = by_code.get(code) if isinstance(code, str) else None
        if link is None:
            result.unknown_codes.append(str(code))
            continue
        if not link.active:
            result.inactive_codes.append(link.code)
            continue
        referrer = e.payload.get("referrer")
        row = (
            e.event_id,
            int(e.type),
            link.workspace_id,
            link.id,
            link.program_id,
            link.affiliate_id,
            e.dialect,
            _ts(e.received_at_ms),
            _inet(e.ip),
            e.user_agent,
            referrer if isinstance(referrer, str) else None,
            e.payload,
        )
        for col, v in zip(cols, row, strict=True):
            col.append(v)

    inserted = await conn.fetch(_INSERT_EVENTS, *cols) if cols[0] else []
    result.inserted = len(inserted)
    result.duplicates = len(cols[0]) - len(inserted)
    if inserted:
        await _move_counters(conn, inserted, {UUID(link.id): link for link in by_code.values()})
    return result


async def _move_counters(conn: asyncpg.Connection, inserted: list[Any], links: dict[UUID, LinkInfo]) -> None:
    """Aggregate per link (one UPDATE row per link, however viral) and per link and day."""
    per_link: dict[UUID, _Counts] = defaultdict(_Counts)
    per_day: dict[tuple[UUID, date], _Counts] = defaultdict(_Counts)
    for row in inserted:
        kind = EventType(row["type"])
        for c in (per_link[row["link_id"]], per_day[(row["link_id"], row["received_at"].date())]):
            if kind is EventType.CLICK:
                c.clicks += 1
                if c.last_clicked_at is None or row["received_at"] > c.last_clicked_at:
                    c.last_clicked_at = row["received_at"]
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
