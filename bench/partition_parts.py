"""Part (p), outside the default set (``--only p``): the worker's events/s into an events
table already holding ``--fill-rows`` rows (default 20 million, over the last 30 daily
partitions), against the same worker into an empty one, side by side in one run; and the
time to drop one day's partition of the full table."""

from __future__ import annotations

import random
import time
from datetime import UTC, date, datetime, timedelta

import asyncpg

from ingest.contract.keys import Keys
from workers.consumer.partitions import day_uuid, drop, maintain

from .context import Ctx, say
from .pipeline_parts import _drained, _until
from .world import backlog, copy_database, fill, mixed

FILL_DAYS = 30
_CHUNK = 500_000
_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"

# rows as the worker writes them (a browser click with its enrichment), ids over one day
_FILL = """
INSERT INTO {table} (event_id, type, workspace_id, link_id, program_id, affiliate_id, visitor_id, visitor_key,
                    dialect, received_at, processed_at, ip, user_agent, referrer, country, asn, enrichment, payload)
SELECT (lpad(to_hex(g.ms), 12, '0') || '7' || substr(g.h, 1, 3) || '8' || substr(g.h, 4, 15))::uuid,
       1, l.workspace_id, l.id, l.program_id, l.affiliate_id, 'v' || (g.i % 50000), 'v' || (g.i % 50000),
       'affitor', to_timestamp(g.ms / 1000.0), to_timestamp(g.ms / 1000.0),
       ('81.2.' || (g.i % 250) || '.' || (g.i % 200 + 1))::inet, $5, 'https://blog.example.com/', 'GB', 20712,
       '{"device": {"type": "desktop", "browser": "Chrome", "os": "Windows"}, "geo": {"country": "GB"}}',
       jsonb_build_object('code', l.code)
FROM (SELECT i, $1::bigint + (i * $2::bigint) / $3::bigint AS ms, md5(i::text || ($1::bigint)::text) AS h
      FROM generate_series(0, $3::bigint - 1) i) g
JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS n, * FROM links) l ON l.n = g.i % $4::bigint
"""


async def _maintained(url: str, today: date, days: int) -> None:
    """The worker's own partitions: yesterday (when not made already) to a week ahead."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        await maintain(pool, retention_days=days, dedupe_days=400, today=today)
    finally:
        await pool.close()


async def _fill(url: str, rows: int, today: date) -> float:
    """``rows`` events over the last FILL_DAYS days up to now, a day's partition at a time:
    filled as a plain table, then attached (its indexes built in bulk, as a restore or a
    backfill would); the seconds it took."""
    start = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        links = await conn.fetchval("SELECT count(*) FROM links")
        per_day = rows // FILL_DAYS
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        for d in range(FILL_DAYS - 1, -1, -1):
            day = today - timedelta(days=d)
            day_start = int(datetime.combine(day, datetime.min.time(), UTC).timestamp() * 1000)
            span = min(86_400_000, now_ms - day_start - 1)  # today: up to now, not ahead of the worker's ids
            name = f"events_p{day:%Y%m%d}"
            await conn.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            for offset in range(0, per_day, _CHUNK):
                n = min(_CHUNK, per_day - offset)
                first = day_start + span * offset // per_day
                await conn.execute(_FILL.replace("{table}", name), first, span * n // per_day, n, links, _UA)
            lo, hi = day_uuid(day), day_uuid(day + timedelta(days=1))
            await conn.execute(f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}')")
            say(f"(p) filled {(FILL_DAYS - d) * per_day:,} of {per_day * FILL_DAYS:,} rows")
        await conn.execute("VACUUM ANALYZE events")
        await conn.execute("CHECKPOINT")  # the fill's dirty pages written before anything is measured
    finally:
        await conn.close()
    return time.monotonic() - start


async def _drain(ctx: Ctx, url: str, keys: Keys, name: str) -> float:
    """``refstream work --drain`` over the mixed events in ``keys``: events/s."""
    worker = ctx.procs.refstream(name, "work", "--drain", DATABASE_URL=url, REFSTREAM_STREAM_PREFIX=keys.prefix)

    async def started() -> bool:
        return (await backlog(ctx.redis, keys))[1] > 0

    t0 = await _until("the worker to read", started, 120)
    t1 = await _drained(ctx, keys, limit_s=900)
    if worker.wait(120) != 0:
        raise RuntimeError(f"work --drain failed: {ctx.procs.tail(name)}")
    return ctx.opts.drain_events / (t1 - t0)


async def part_p(ctx: Ctx) -> None:
    today = datetime.now(UTC).date()
    full = f"{ctx.world.database}_pfull"  # filled once, kept over the runs
    conn = await asyncpg.connect(ctx.world.url("postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", full)
    finally:
        await conn.close()
    if not exists:
        await copy_database(ctx.world, full)
        say(f"(p) filling {ctx.opts.fill_rows:,} rows")
        ctx.note("p.fill_s", await _fill(ctx.world.url(full), ctx.opts.fill_rows, today))
        await _maintained(ctx.world.url(full), today, FILL_DAYS + 5)
    empty = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_pempty")
    await _maintained(ctx.world.url(empty), today, FILL_DAYS + 5)

    # empty, full, full, empty: neither gains from going first or second
    rng = random.Random(ctx.run)
    rates: dict[str, list[float]] = {"empty": [], "full": []}
    for i, label in enumerate(("empty", "full", "full", "empty")):
        keys = ctx.keys(f"p{i}")
        await fill(ctx.redis, keys, mixed(ctx.world, ctx.opts.drain_events, rng))
        url = ctx.world.url(empty if label == "empty" else full)
        rates[label].append(await _drain(ctx, url, keys, f"worker-p{i}-{label}"))
        ctx.note(f"p.drain{i + 1}_{label}_events_per_s", rates[label][-1])
    for label, found in rates.items():
        ctx.note(f"p.{label}_events_per_s", sum(found) / len(found))
    conn = await asyncpg.connect(ctx.world.url(full))
    try:
        ctx.note(
            "p.rows_before",
            await conn.fetchval(
                "SELECT sum(reltuples)::bigint FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid"
                " WHERE i.inhparent = 'events'::regclass"
            ),
        )
        oldest = await conn.fetchrow(
            "SELECT c.relname, c.reltuples::bigint AS n FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'events'::regclass AND c.relname LIKE 'events_p%' AND c.reltuples > 0"
            " ORDER BY c.relname LIMIT 1"
        )
        if oldest is not None:
            start = time.monotonic()
            await drop(conn, oldest["relname"])
            ctx.note("p.drop_day_s", time.monotonic() - start)
            ctx.note("p.dropped_rows", oldest["n"])
    finally:
        await conn.close()
    ctx.note("p.ratio", ctx.figures["p.full_events_per_s"] / ctx.figures["p.empty_events_per_s"])
