"""`refstream migrate` from schema 3 (plain events and link_visitor_days tables holding rows)
to 4: one transaction turns each into the legacy partition of a partitioned table, copies
no row, backfills the dedupe keys; serve and work refuse the database until it has run.
From 4 to 5 (drops and fraud flags): additive, rows kept, idempotent."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from ingest.contract import links
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, ensure_database, migrate
from workers.consumer.partitions import day_uuid, maintain
from workers.consumer.store import write_batch

V3 = Path(__file__).parent / "data" / "schema_v3.sql"
V4 = Path(__file__).parent / "data" / "schema_v4.sql"
DAY1 = int(datetime(2024, 3, 1, 10, tzinfo=UTC).timestamp() * 1000)

_OLD_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name) SELECT id, 'Main' FROM w RETURNING id, workspace_id),
a AS (INSERT INTO affiliates (workspace_id, program_id, external_id)
      SELECT workspace_id, id, 'u1' FROM p RETURNING id, workspace_id, program_id)
INSERT INTO links (workspace_id, program_id, affiliate_id, code, url, clicks, unique_clicks, leads)
SELECT workspace_id, program_id, id, 'OLD', 'https://example.com/', 2, 2, 1 FROM a RETURNING id, workspace_id
"""
_OLD_EVENT = """
INSERT INTO events (event_id, type, workspace_id, link_id, visitor_id, visitor_key, customer_external_id, name,
                    dedupe_key, dialect, received_at, payload)
VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, 'refport', $9, '{}')
"""
_PARTS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass ORDER BY 1
"""


async def at_v3(url: str) -> tuple[Any, Any, list[Any]]:
    """A database as schema 3 left it, with a link and three events (one a lead with a dedupe key)."""
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(V3.read_text())
        await conn.execute(
            "CREATE TABLE refstream_schema (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
            " version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO refstream_schema (version) VALUES (3)"
        )
        link = await conn.fetchrow(_OLD_WORLD)
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        ids = [uuid7(DAY1), uuid7(DAY1 + 1000), uuid7(now_ms)]
        for i, (event_id, type_, at) in enumerate(zip(ids, (1, 2, 1), (DAY1, DAY1 + 1000, now_ms), strict=True)):
            lead = type_ == 2
            await conn.execute(
                _OLD_EVENT,
                event_id,
                type_,
                link["workspace_id"],
                link["id"],
                f"v{i}",
                "c1" if lead else None,
                "Sign Up" if lead else None,
                "lead\x1fc1\x1fSign Up" if lead else None,
                datetime.fromtimestamp(at / 1000, UTC),
            )
        await conn.execute(
            "INSERT INTO link_visitor_days VALUES ($1, '2024-03-01', 'v0'), ($1, $2, 'v2')",
            link["id"],
            datetime.now(UTC).date(),
        )
        return link["id"], link["workspace_id"], ids
    finally:
        await conn.close()


async def test_a_schema_3_database_with_rows_is_converted_in_one_go(scratch_url: str, settings: Settings):
    link, workspace, ids = await at_v3(scratch_url)
    status = await schema_check.check_url(scratch_url)
    assert status.kind is schema_check.Kind.NOT_MIGRATED and "schema version 3, expected" in status.reason

    conn = await asyncpg.connect(scratch_url)
    try:
        assert await migrate(conn) == SCHEMA_VERSION
        kinds = await conn.fetch(
            "SELECT relname, relkind::text FROM pg_class WHERE relname IN ('events', 'link_visitor_days') ORDER BY 1"
        )
        assert [tuple(r) for r in kinds] == [("events", "p"), ("link_visitor_days", "p")]
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        parts = {r["relname"]: r["bound"] for r in await conn.fetch(_PARTS, "events")}
        assert parts == {
            "events_default": "DEFAULT",
            "events_legacy": f"FOR VALUES FROM (MINVALUE) TO ('{day_uuid(tomorrow)}')",
        }
        visits = {r["relname"]: r["bound"] for r in await conn.fetch(_PARTS, "link_visitor_days")}
        assert visits["link_visitor_days_legacy"] == f"FOR VALUES FROM (MINVALUE) TO ('{tomorrow}')"
        assert [r["event_id"] for r in await conn.fetch("SELECT event_id FROM events ORDER BY 1")] == ids
        assert await conn.fetchval("SELECT count(*) FROM link_visitor_days") == 2
        assert [tuple(r) for r in await conn.fetch("SELECT type, dedupe_key, event_id FROM event_dedupe")] == [
            (2, "lead\x1fc1\x1fSign Up", ids[1])
        ]
        before = [tuple(r) for r in await conn.fetch(_PARTS, "events")]
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
        assert [tuple(r) for r in await conn.fetch(_PARTS, "events")] == before
    finally:
        await conn.close()
    assert (await schema_check.check_url(scratch_url)).ok

    pool = await create_pg_pool(settings.model_copy(update={"database_url": scratch_url}), min_size=1, max_size=2)
    try:
        # the old lead's key was carried over: the same lead again is a no-op; a click counts
        again = {"code": "OLD", "visitor_id": "c1", "external_id": "c1", "name": "Sign Up"}
        click = {"code": "OLD", "visitor_id": "v9"}
        done = await write_batch(
            pool, [Envelope(EventType.LEAD, Dialect.REFPORT, again), Envelope(EventType.CLICK, Dialect.AFFITOR, click)]
        )
        assert (done.inserted, done.duplicates) == (1, 1)
        assert tuple(await pool.fetchrow("SELECT clicks, leads FROM links WHERE id = $1", link)) == (3, 1)
        # maintenance carries on after the legacy partition's bound, overlapping nothing
        made = await maintain(pool, retention_days=90, dedupe_days=400)
        assert made.created and made.dropped == []
        first = min(n for n in made.created if n.startswith("events_p"))
        assert first == f"events_p{tomorrow:%Y%m%d}"
        # the legacy partition goes once its newest day is past the retention
        later = await maintain(pool, retention_days=90, dedupe_days=400, today=tomorrow + timedelta(days=90))
        assert "events_legacy" in later.dropped and "link_visitor_days_legacy" in later.dropped
        assert await pool.fetchval("SELECT count(*) FROM events WHERE workspace_id = $1", workspace) == 0
    finally:
        await pool.close()


async def test_a_version_recorded_over_plain_tables_is_refused_then_migrated(scratch_url: str):
    await at_v3(scratch_url)
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute("UPDATE refstream_schema SET version = $1", SCHEMA_VERSION)  # a hand edit, a restore
        status = await schema_check.check_url(scratch_url)
        assert status.kind is schema_check.Kind.NOT_MIGRATED
        assert "events, link_visitor_days not partitioned (half-migrated)" in status.reason
        assert await migrate(conn) == SCHEMA_VERSION
        assert (await schema_check.check_url(scratch_url)).ok
    finally:
        await conn.close()


def test_the_bounds_are_the_days_first_millisecond():
    assert day_uuid(date(2024, 3, 1)).int >> 80 == int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)


_CLICK_IP_INDEXES = """
SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class x ON x.oid = i.indexrelid
WHERE pg_get_indexdef(i.indexrelid) LIKE '%(link_id, ip, received_at)%' ORDER BY 1
"""


async def test_a_schema_4_database_takes_schema_5_and_on(scratch_url: str, settings: Settings):
    await ensure_database(scratch_url)
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute(V4.read_text())
        await conn.execute(
            "CREATE TABLE refstream_schema (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
            " version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO refstream_schema (version) VALUES (4)"
        )
        lo, hi = day_uuid(date(2024, 3, 1)), day_uuid(date(2024, 3, 2))
        await conn.execute(f"CREATE TABLE events_p20240301 PARTITION OF events FOR VALUES FROM ('{lo}') TO ('{hi}')")
        link = await conn.fetchrow(_OLD_WORLD)
        old = uuid7(DAY1)
        await conn.execute(
            _OLD_EVENT,
            old,
            1,
            link["workspace_id"],
            link["id"],
            "v0",
            None,
            None,
            None,
            datetime.fromtimestamp(DAY1 / 1000, UTC),
        )
        assert (await schema_check.check_url(scratch_url)).version == 4

        cached_version = await conn.fetchval("SELECT (extract(epoch FROM updated_at) * 1000000)::bigint FROM links")
        assert await migrate(conn) == SCHEMA_VERSION
        # schema 6: a link's cache version (a sequence) outranks what an older build cached (updated_at's µs)
        old_link = await links.fetch(conn, "OLD")
        assert old_link is not None and old_link.version > cached_version
        tables = {r["relname"] for r in await conn.fetch("SELECT relname FROM pg_class WHERE relkind = 'r'")}
        assert {"drop_stats", "event_drops", "drop_folds", "event_flags", "affiliate_ips"} <= tables
        # schema 5's click_burst index (on the partitioned table, so on each partition) went
        # with schema 18, whose windows count the rule instead
        assert [r["relname"] for r in await conn.fetch(_CLICK_IP_INDEXES)] == []
        assert "click_windows" in tables
        assert await conn.fetchval("SELECT fraud_policy::text FROM workspaces") == "{}"
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
    finally:
        await conn.close()
    assert (await schema_check.check_url(scratch_url)).ok

    pool = await create_pg_pool(settings.model_copy(update={"database_url": scratch_url}), min_size=1, max_size=2)
    try:
        test = {"code": "OLD", "visitor_id": "v9", "test_mode": True}
        done = await write_batch(pool, [Envelope(EventType.CLICK, Dialect.AFFITOR, test)])
        assert done.inserted == 1
        assert await pool.fetchval("SELECT n FROM drop_stats WHERE reason = 'test_mode'") == 1
    finally:
        await pool.close()
