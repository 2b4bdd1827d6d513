"""A database as an older build left it, for the migration tests: its schema.sql as it was
at that version (tests/data/schema_v<N>.sql), its recorded version, and today's partitions."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from workers.consumer.partitions import maintain

DATA = Path(__file__).parent / "data"


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
