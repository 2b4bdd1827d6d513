"""Daily partitions of ``events`` and ``link_visitor_days``: created ahead, dropped after
the retention, run by the worker's housekeeping (workers/consumer/consume.py) on its own timer.

``events`` is range-partitioned on ``event_id`` (a UUIDv7 sorts by its millisecond), a day's
bounds being the UUIDs of its first millisecond and the next day's; ``link_visitor_days`` on
``day``. Each run, under an advisory lock (one worker at a time does it):

- creates the partitions of yesterday, today and the next ``AHEAD_DAYS`` days that no
  partition covers yet. A partition is made empty, the rows of its range that landed in the
  default partition meanwhile are moved into it, then it is attached: ATTACH takes a SHARE
  UPDATE EXCLUSIVE lock on the parent, which inserts never wait for;
- drops every partition whose range ends on or before the retention's first day (the
  legacy partition of a migrated database too, once its newest day is past), and deletes
  the default partition's rows older than that day. A drop needs an ACCESS EXCLUSIVE lock
  on the parent, so it waits at most ``LOCK_TIMEOUT`` for the batches in flight (new ones
  queue behind it for that long at most), else it is tried again next run;
- first of all, records the horizon (the retention's first day) in ``event_retention``:
  an event id below it may be dropped, so the worker stores such an event without moving
  a counter, and reconcile never recounts before it;
- purges ``event_dedupe`` keys older than the dedupe retention, in chunks, and the other
  tables that grow with traffic (``workers/consumer/retention.py``).

Which day it is, is Postgres's to say (``clock_timestamp()``, in UTC), never this
process's (docs/guarantees.md: one clock decides): a worker whose clock ran a year ahead once dropped every
daily partition and moved the horizon past every new event, so nothing counted. And a
process whose own clock differs from Postgres's by more than ``REFSTREAM_CLOCK_SKEW_MAX_S``
does nothing destructive at all (no horizon, drop or purge: it logs
``partitions.clock_skewed`` and leaves them to a worker whose clock agrees); it still
creates the partitions of Postgres's days, which destroys nothing.

Nothing is refused for lacking a partition: the default partition takes whatever no daily
one covers. pg_partman is not needed (and not used) for any of it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import clock
from workers.consumer import retention

log = structlog.get_logger("workers.partitions")

AHEAD_DAYS = 7
DAY_MS = 86_400_000
LOCK_TIMEOUT = "1s"
DEDUPE_CHUNK = 10_000
WEBHOOK_DAYS = 30  # REFSTREAM_WEBHOOK_RETENTION_DAYS's default
_LOCK = 0x7265_6670_6172  # any constant: the same for every worker
_EPOCH = date(1970, 1, 1)
_BOUND = re.compile(r"FROM \((.+?)\) TO \((.+?)\)")

_PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::regclass
"""
_HORIZON = """
INSERT INTO event_retention (horizon, horizon_id) VALUES ($1, $2)
ON CONFLICT (singleton) DO UPDATE SET horizon = EXCLUDED.horizon, horizon_id = EXCLUDED.horizon_id
WHERE event_retention.horizon < EXCLUDED.horizon
"""
_PURGE_DEDUPE = """
DELETE FROM event_dedupe WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM event_dedupe WHERE received_at < $1 LIMIT $2))
"""


def day_ms(day: date) -> int:
    return (day - _EPOCH).days * DAY_MS


def ms_day(ms: int) -> date:
    """The UTC day of a Unix millisecond."""
    return _EPOCH + timedelta(days=ms // DAY_MS)


def day_uuid(day: date) -> UUID:
    """The lower bound of ``day`` in ``events``: the smallest UUIDv7 of its first millisecond
    (of 1970-01-01 for any day before it: a UUIDv7 has no earlier time)."""
    return UUID(int=(max(0, day_ms(day)) << 80) | (0x7 << 76) | (0b10 << 62))


def uuid_day(value: UUID) -> date:
    """The UTC day of a UUIDv7's millisecond."""
    return _EPOCH + timedelta(days=(value.int >> 80) // DAY_MS)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    bound: Callable[[date], object]  # a day's lower bound, as asyncpg sends it
    day_of: Callable[[str], date]  # a bound as pg_get_expr prints it -> its day
    older: str  # the default partition's rows before $1 (a bound)


EVENTS = _Table("events", day_uuid, lambda text: uuid_day(UUID(text)), "event_id < $1")
VISITS = _Table("link_visitor_days", lambda d: d, date.fromisoformat, "day < $1")


@dataclass(slots=True)
class Maintenance:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    purged_default: int = 0
    purged_dedupe: int = 0
    skipped: bool = False  # another worker held the lock
    refused: str | None = None  # why nothing destructive was done (this process's clock)
    purged: dict[str, int] = field(default_factory=dict)  # rows of other tables, by workers.consumer.retention


def _ranges(rows: list[asyncpg.Record], table: _Table) -> dict[str, tuple[date | None, date | None]]:
    """Each non-default partition's [first day, first day after) (None: unbounded)."""
    out: dict[str, tuple[date | None, date | None]] = {}
    for r in rows:
        m = _BOUND.search(r["bound"] or "")
        if m is None:
            continue  # DEFAULT
        ends = [None if v == "MINVALUE" or v == "MAXVALUE" else table.day_of(v.strip("'")) for v in m.groups()]
        out[r["relname"]] = (ends[0], ends[1])
    return out


def _covered(day: date, ranges: dict[str, tuple[date | None, date | None]]) -> bool:
    return any((lo is None or lo <= day) and (hi is None or day < hi) for lo, hi in ranges.values())


async def create_day(conn: asyncpg.Connection, table: _Table, day: date) -> str:
    """The partition of ``day``, made empty, given the default partition's rows of its range, attached."""
    name = f"{table.name}_p{day:%Y%m%d}"
    lo, hi = table.bound(day), table.bound(day + timedelta(days=1))
    key = "event_id" if table is EVENTS else "day"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"CREATE TABLE {name} (LIKE {table.name} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        default = f"{table.name}_default"
        # no insert lands in the default partition between the move and the attach
        await conn.execute(f"LOCK TABLE {default} IN EXCLUSIVE MODE")
        await conn.execute(
            f"WITH moved AS (DELETE FROM {default} WHERE {key} >= $1 AND {key} < $2 RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved",
            lo,
            hi,
        )
        lo_sql, hi_sql = (f"'{v}'" for v in (lo, hi))
        await conn.execute(f"ALTER TABLE {table.name} ATTACH PARTITION {name} FOR VALUES FROM ({lo_sql}) TO ({hi_sql})")
    return name


async def ensure_days(conn: asyncpg.Connection, days: set[date], first_kept: date) -> list[str]:
    """The partitions of ``days`` (those on or after ``first_kept``) that no partition covers
    yet, in both tables, made as ``maintain`` makes them and under its lock, waited for: an
    import's past days (``workers.ops.imports``), so that history lands in its own day."""
    days = {d for d in days if d >= first_kept}
    if not days:
        return []
    made = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
    try:
        for table in (EVENTS, VISITS):
            ranges = _ranges(await conn.fetch(_PARTITIONS, table.name), table)
            for day in sorted(d for d in days if not _covered(d, ranges)):
                name = await create_day(conn, table, day)
                ranges[name] = (day, day + timedelta(days=1))
                made.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    if made:
        log.info("partitions", created=made)
    return made


async def drop(conn: asyncpg.Connection, name: str) -> None:
    """Drop one partition, waiting at most ``LOCK_TIMEOUT`` for the batches in flight."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute(f"DROP TABLE {name}")


async def _create(conn: asyncpg.Connection, table: _Table, today: date, first_kept: date, out: Maintenance) -> None:
    ranges = _ranges(await conn.fetch(_PARTITIONS, table.name), table)
    for offset in range(-1, AHEAD_DAYS + 1):
        day = today + timedelta(days=offset)
        if day >= first_kept and not _covered(day, ranges):
            name = await create_day(conn, table, day)
            ranges[name] = (day, day + timedelta(days=1))
            out.created.append(name)


async def _expire(conn: asyncpg.Connection, table: _Table, first_kept: date, out: Maintenance) -> None:
    ranges = _ranges(await conn.fetch(_PARTITIONS, table.name), table)
    for name, (_, hi) in sorted(ranges.items()):
        if hi is not None and hi <= first_kept:
            try:
                await drop(conn, name)
                out.dropped.append(name)
            except asyncpg.LockNotAvailableError:
                log.warning("partitions.drop_postponed", partition=name, waited=LOCK_TIMEOUT)
    status = await conn.execute(f"DELETE FROM {table.name}_default WHERE {table.older}", table.bound(first_kept))
    out.purged_default += int(status.split()[-1])


async def _warn_horizon_ahead(conn: asyncpg.Connection, first_kept: date) -> None:
    """The horizon only moves forward: one recorded ahead of Postgres's day (by a build that
    took a skewed worker's clock) keeps events below it from counting until Postgres's day
    catches up. Said, not undone: rows below it may be gone, and a replay of them would
    count twice."""
    recorded = await conn.fetchval("SELECT horizon FROM event_retention")
    if recorded is not None and recorded.astimezone(UTC).date() > first_kept:
        log.warning("partitions.horizon_ahead", horizon=recorded.isoformat(), expected=first_kept.isoformat())


@asynccontextmanager
async def _connection(source: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(source, asyncpg.Connection):
        yield source
    else:
        async with source.acquire() as conn:
            yield conn


async def maintain(
    source: asyncpg.Pool | asyncpg.Connection,
    *,
    retention_days: int,
    dedupe_days: int,
    today: date | None = None,
    skew_max_s: float = clock.SKEW_MAX_S,
    webhook_days: int = WEBHOOK_DAYS,
) -> Maintenance:
    """One maintenance run on Postgres's day; ``today`` (UTC) may be given instead, for
    tests and the bench. Nothing destructive when this process's clock is more than
    ``skew_max_s`` off Postgres's (``Maintenance.refused`` says so). The other tables'
    retention (``workers.consumer.retention``) runs here too: flags and drops with the events,
    finished webhook deliveries after ``webhook_days``.

    ``refstream migrate`` runs one too, so that the days around today have their partitions
    before any batch inserts: a day attached while batches insert into the default partition
    makes them retry (a partition constraint met mid-routing is contention, never poison)."""
    out = Maintenance()
    async with _connection(source) as conn:
        if today is None:
            reference, skew = await clock.postgres_skew(conn)
            today = datetime.fromtimestamp(reference, UTC).date()
            try:
                clock.check("postgres", skew, skew_max_s)
            except clock.Skewed as exc:
                out.refused = str(exc)
                log.warning(
                    "partitions.clock_skewed",
                    skew_s=round(skew, 3),
                    bound_s=skew_max_s,
                    postgres_day=today.isoformat(),
                    refused="drops, retention, dedupe purge",
                )
        first_kept = today - timedelta(days=retention_days)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
            out.skipped = True
            return out
        try:
            if out.refused is None:
                # the horizon first: from then on a batch counts nothing below it, before any
                # row below it is gone (else a replayed old event could count again in between)
                await conn.execute(_HORIZON, datetime.combine(first_kept, time.min, UTC), day_uuid(first_kept))
                await _warn_horizon_ahead(conn, first_kept)
            for table in (EVENTS, VISITS):
                await _create(conn, table, today, first_kept, out)
                if out.refused is None:
                    await _expire(conn, table, first_kept, out)
            cutoff = datetime.combine(today - timedelta(days=dedupe_days), time.min, UTC)
            while out.refused is None:
                status = await conn.execute(_PURGE_DEDUPE, cutoff, DEDUPE_CHUNK)
                n = int(status.split()[-1])
                out.purged_dedupe += n
                if n < DEDUPE_CHUNK:
                    break
            if out.refused is None:
                kept_from = datetime.combine(first_kept, time.min, UTC)
                webhooks_before = datetime.combine(today - timedelta(days=webhook_days), time.min, UTC)
                done = await retention.purge(
                    conn, horizon_id=day_uuid(first_kept), webhooks_before=webhooks_before, ips_before=kept_from
                )
                out.purged = done.tables
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    if out.created or out.dropped or out.purged_default or out.purged_dedupe or out.purged:
        log.info(
            "partitions",
            created=out.created,
            dropped=out.dropped,
            purged_default=out.purged_default,
            purged_dedupe=out.purged_dedupe,
            purged=out.purged,
        )
    return out
