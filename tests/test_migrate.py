"""`refstream migrate` is idempotent: a second run neither fails nor changes anything."""

from __future__ import annotations

from typing import Any

import asyncpg

from ._procs import Procs

# the schema, its daily partitions aside: migrate makes the days around today (the database's
# today), so another test that moved the partitions to another day (tests/test_explain.py)
# would look like a change; the parents carry every column, index and constraint
PARTITIONS = "SELECT relname FROM pg_class WHERE relispartition AND relnamespace = 'public'::regnamespace"
SNAPSHOT = [
    f"""SELECT table_name, column_name, data_type, column_default, is_nullable
       FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT IN ({PARTITIONS})
       ORDER BY 1, 2""",
    f"""SELECT indexname, indexdef FROM pg_indexes
       WHERE schemaname = 'public' AND tablename NOT IN ({PARTITIONS}) ORDER BY 1""",
    """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
       FROM pg_constraint WHERE connamespace = 'public'::regnamespace
       AND conrelid NOT IN (SELECT oid FROM pg_class WHERE relispartition) ORDER BY 1, 2""",
]

MIGRATED_NEW = {"migrated": True, "database_created": True, "shards": ["default"]}
MIGRATED_AGAIN = {"migrated": True, "database_created": False, "shards": ["default"]}


async def snapshot(pg: asyncpg.Pool) -> list[list[tuple[Any, ...]]]:
    return [[tuple(r) for r in await pg.fetch(q)] for q in SNAPSHOT]


async def test_migrate_twice_no_error_no_change(procs: Procs, pg: asyncpg.Pool):
    before = await snapshot(pg)
    assert len(before[0]) > 50  # the schema is there to compare
    ws = await pg.fetchval("INSERT INTO workspaces (name) VALUES ('kept') RETURNING id")
    for _ in range(2):
        assert await procs.cli("migrate") == MIGRATED_AGAIN
        assert await snapshot(pg) == before
    assert await pg.fetchval("SELECT name FROM workspaces WHERE id = $1", ws) == "kept"


async def test_migrate_creates_a_missing_database(procs: Procs, settings):
    from refstream.services import with_database

    name = settings.stream_prefix.replace(":", "_") + "_fresh"
    url = with_database(settings.database_url, name)
    try:
        assert await procs.cli("migrate", DATABASE_URL=url) == {
            "migrated": True,
            "database_created": True,
            "shards": ["default"],
        }
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM links") == 0
        finally:
            await conn.close()
    finally:
        server = await asyncpg.connect(with_database(settings.database_url, "postgres"))
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()
