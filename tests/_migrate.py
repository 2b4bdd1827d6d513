"""A database as an older build left it, for the migration tests: its schema.sql as it was
at that version (tests/data/schema_v<N>.sql, or ``schema_until``'s cut of today's), its
recorded version, and today's partitions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from ingest.contract.connections import create_pg_pool
from ingest.contract.settings import Settings
from ingest.manage.db import ensure_database, schema_sql
from workers.consumer.partitions import maintain

DATA = Path(__file__).parent / "data"


def schema_until(version: int) -> str:
    """schema.sql as it was at ``version``: today's, up to the section of ``version`` + 1.
    A version's changes are appended to the file (``ingest.manage.db``), so that is the
    older build's file from schema 20 on, where no copy of it is kept in tests/data."""
    text = schema_sql()
    return text[: text.index(f"\n-- Schema version {version + 1}:") + 1]


async def old_database(conn: asyncpg.Connection, version: int, sql: str | None = None) -> None:
    """Make ``conn``'s (empty) database what ``refstream migrate`` of schema ``version`` made
    (its schema.sql: ``sql``, else tests/data's copy)."""
    await conn.execute(sql if sql is not None else (DATA / f"schema_v{version}.sql").read_text())
    await conn.execute(
        "CREATE TABLE refstream_schema (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
        " version integer NOT NULL, migrated_at timestamptz NOT NULL DEFAULT now());"
        f" INSERT INTO refstream_schema (version) VALUES ({int(version)})"
    )
    await maintain(conn, retention_days=30, dedupe_days=60)


@asynccontextmanager
async def scratch(url: str, settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Pool]]:
    """The (empty) database ``url`` names, made where it is not: a connection to it and a
    worker's pool of two, closed after."""
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    pool = await create_pg_pool(settings.model_copy(update={"database_url": url}), min_size=1, max_size=2)
    try:
        yield conn, pool
    finally:
        await pool.close()
        await conn.close()


# docs/operations.md, "Migrating to schema 26", rolling back: a referrer's domain into the
# rows that leave it to their referrer, one page of it; then the index of a link's events by
# its id again (there partition by partition, CONCURRENTLY), and schema 26's functions gone
ROLLBACK_26_PAGE = """
WITH page AS (
    SELECT event_id FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000
), done AS (
    UPDATE events e
    SET enrichment = coalesce(e.enrichment, '{}') || jsonb_build_object('referrer_domain', referrer_domain(e.referrer))
    FROM page WHERE e.event_id = page.event_id AND e.device_id IS NOT NULL
      AND NOT coalesce(e.enrichment ? 'referrer_domain', false) AND referrer_domain(e.referrer) IS NOT NULL
)
SELECT event_id AS last FROM page ORDER BY event_id DESC LIMIT 1
"""
ROLLBACK_26 = """
CREATE INDEX IF NOT EXISTS events_link_received ON events (link_id, received_at);
DROP INDEX IF EXISTS events_link_key_received;
DROP FUNCTION IF EXISTS event_enrichment(jsonb, integer, integer, inet, text, integer, boolean, text);
DROP FUNCTION IF EXISTS referrer_domain(text);
"""


async def rollback_26(conn: asyncpg.Connection) -> None:
    """Schema 26's rollback: its pages to the end, then the rest."""
    last = uuid.UUID(int=0)
    while (last := await conn.fetchval(ROLLBACK_26_PAGE, last)) is not None:
        pass
    await conn.execute(ROLLBACK_26)


# docs/operations.md, "Migrating to schema 25", rolling back: a burst_flags row's ids become
# event_flags rows, as schemas 23 and 24 read them
ROLLBACK_25 = """
INSERT INTO event_flags (event_id, rule, workspace_id, excluded, evidence)
SELECT i, 'click_burst', workspace_id, false,
       jsonb_build_object('clicks', clicks + 1, 'threshold_clicks', clicks, 'window_seconds', seconds)
FROM burst_flags CROSS JOIN LATERAL unnest(ids) AS i
ON CONFLICT DO NOTHING;
DROP VIEW IF EXISTS click_burst_flags;
DROP TABLE IF EXISTS burst_flags;
"""
