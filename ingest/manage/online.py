"""The indexes schema.sql leaves to be built online, after ``migrate``'s transaction.

An index made on a partitioned table in a transaction is built on every partition under a
lock that holds every insert for the whole scan: minutes on a table of months of events. So
schema.sql makes a new index on a database that holds rows "ON ONLY" the partitioned table
(invalid: no plan uses it, nothing is built), and ``build`` then makes it on each partition
with ``CREATE INDEX CONCURRENTLY`` (inserts go on; it cannot run in a transaction) and
attaches it there; once every partition's is attached, Postgres marks the parent valid, and
the index it replaces (``REPLACES``) is dropped: never before, so a read always has one of
the two. A partition created meanwhile (the workers' maintenance) gets the index at once.

Resumable: a build interrupted part way (a crash, a cancel, a deadlock with other DDL)
leaves the partitions done attached and at most one invalid index on a partition, which the
next ``refstream migrate`` drops and builds again.
"""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger("ingest.migrate")

# a new index -> the one it replaces, dropped once the new one is valid
REPLACES = {
    "events_workspace_nonclick": "events_workspace_type_id",
    "events_workspace_visitor_known": "events_workspace_visitor",
    "events_workspace_named_click": "events_workspace_click",  # schema 20
    "events_link_key_received": "events_link_received",  # schema 26
}

# one build at a time; a second `refstream migrate` leaves it to the first (session level:
# taken outside any transaction, like the builds)
_BUILD_LOCK = 0x7265_6673_6964  # "refsid"

# the partitioned indexes not valid yet, with their tables
_PENDING = """
SELECT ci.relname AS index, t.relname AS "table", pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
WHERE ci.relkind = 'I' AND NOT i.indisvalid AND ci.relnamespace = current_schema()::regnamespace
ORDER BY 1
"""
# a table's partitions that have no index attached to the partitioned index $2
_MISSING = """
SELECT p.relid::regclass::text AS partition FROM pg_partition_tree($1::regclass) p
WHERE p.isleaf AND NOT EXISTS (
    SELECT 1 FROM pg_inherits h JOIN pg_index x ON x.indexrelid = h.inhrelid
    WHERE h.inhparent = $2::regclass AND x.indrelid = p.relid)
ORDER BY 1
"""
_VALID = """
SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace
"""


def partition_index(partition: str, index: str, table: str) -> str:
    """The name of ``index``'s copy on ``partition``: ``events_p20240301_workspace_nonclick``."""
    return f"{partition}_{index.removeprefix(table + '_')}"[:63]


def on_partition(definition: str, name: str, partition: str) -> str:
    """``pg_get_indexdef`` of the partitioned index, made on one partition, concurrently."""
    using = definition.index(" USING ")
    return f'CREATE INDEX CONCURRENTLY "{name}" ON "{partition}"{definition[using:]}'


async def build(conn: asyncpg.Connection) -> list[str]:
    """Build what schema.sql left invalid, then drop what it replaces; the indexes made on
    partitions. On a connection outside any transaction. Nothing to do (a new database, or
    one migrated before): two catalog reads."""
    made: list[str] = []
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _BUILD_LOCK):
        log.info("migrate.indexes_left", reason="another migrate is building them")
        return made
    try:
        for pending in await conn.fetch(_PENDING):
            index, table = pending["index"], pending["table"]
            for r in await conn.fetch(_MISSING, table, index):
                name = partition_index(r["partition"], index, table)
                if await conn.fetchval(_VALID, name) is False:  # an interrupted build's
                    await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
                if await conn.fetchval(_VALID, name) is None:
                    log.info("migrate.index_building", index=name)
                    await conn.execute(on_partition(pending["definition"], name, r["partition"]))
                    made.append(name)
                await conn.execute(f'ALTER INDEX "{index}" ATTACH PARTITION "{name}"')
        for new, old in REPLACES.items():
            if await conn.fetchval(_VALID, new) and await conn.fetchval(_VALID, old) is not None:
                await conn.execute(f'DROP INDEX IF EXISTS "{old}"')
                log.info("migrate.index_replaced", index=old, by=new)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _BUILD_LOCK)
    return made
