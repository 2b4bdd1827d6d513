"""`refstream migrate` from schema 18 to 19 on a database holding today's events: the index
of a link's events by event id (``events_link_id``) goes from every partition, and GET
/v1/events?link_id= reads them by time (``events_link_received``; by the link's key, schema 26,
``events_link_key_received``), newest first by received time.
The rollback (docs/operations.md) is the older build's migrate, which makes the index again.

Schema 18's schema.sql is schema 19's (tests/data) up to schema 19's part, with the index it
made: the one thing 19 took out of it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ingest.contract.events import uuid7
from ingest.contract.settings import Settings
from ingest.manage import manage, schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate, schema_sql
from workers.consumer.store import write_batch

from ._migrate import DATA, old_database, rollback_26, scratch
from .test_bursts import _click

_V19 = (DATA / "schema_v19.sql").read_text()
V18 = (
    _V19[: _V19.index("-- Schema version 19:")]
    + "CREATE INDEX IF NOT EXISTS events_link_id ON events (link_id, event_id);\n"
)
AHEAD = re.compile(r"CREATE TABLE IF NOT EXISTS (event_agents|burst_windows|burst_pending) \(.*?\n\);", re.S)
_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name) SELECT id, 'Main' FROM w RETURNING id, workspace_id)
INSERT INTO links (workspace_id, program_id, code, url)
SELECT workspace_id, id, 'OLD1', 'https://example.com/' FROM p
RETURNING id, workspace_id, program_id
"""
# a producer that sets an event's id and its time apart: an id minted now, received an hour ago
_FOREIGN = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, dialect, received_at)
VALUES ($1, 1, $2, $3, $4, 'native', now() - interval '1 hour')
"""
_INDEXES = """
SELECT c.relname AS table, pg_get_indexdef(i.indexrelid) LIKE '%(link_id, event_id)%' AS by_id
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE (pg_get_indexdef(i.indexrelid) LIKE '%(link_id, event_id)%'
       OR pg_get_indexdef(i.indexrelid) LIKE '%(link_id, received_at)%'
       OR pg_get_indexdef(i.indexrelid) LIKE '%(uuid_hash_extended(link_id, (0)::bigint), received_at)%')
  AND c.relname LIKE 'events%'
ORDER BY 1, 2
"""


async def test_a_schema_18_database_reads_a_links_events_without_their_own_index(
    scratch_url: str, settings: Settings
) -> None:
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 18, V18)
        link = await conn.fetchrow(_WORLD)
        ws = str(link["workspace_id"])
        at = int((datetime.now(UTC) - timedelta(seconds=30)).timestamp() * 1000)
        clicks = [_click({"workspace_id": ws}, "OLD1", f"198.51.100.{i}", at + 1000 * i) for i in range(6)]
        # stored by this build's worker, which names events.agent_id in event_agents (schema
        # 20), merges its clicks into burst_windows (21) and leaves them to judge in
        # burst_pending (23): those alone made ahead
        await conn.execute("ALTER TABLE events ADD COLUMN agent_id integer")
        for made in AHEAD.finditer(schema_sql()):
            await conn.execute(made.group(0))
        assert (await write_batch(pool, clicks)).inserted == 6
        foreign = uuid7()
        await conn.execute(_FOREIGN, foreign, link["workspace_id"], link["id"], link["program_id"])
        before = [tuple(r) for r in await conn.fetch(_INDEXES)]
        tables = {t for t, _ in before}
        assert len(tables) >= 3 and {(t, True) for t in tables} | {(t, False) for t in tables} == set(before)
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 19
        assert (await schema_check.check_url(scratch_url)).ok
        # on every partition, and the partitioned table: the link's index by time only
        assert [tuple(r) for r in await conn.fetch(_INDEXES)] == [(t, False) for t in sorted(tables)]
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing

        # the link's newest first by received time: the clicks, the newest first, then the
        # event received an hour before them whatever its id
        page = await manage.list_events(conn, ws, link_id=str(link["id"]), type_=None, limit=10)
        assert [e["event_id"] for e in page] == [str(c.event_id) for c in reversed(clicks)] + [str(foreign)]
        page = await manage.list_events(conn, ws, link_id=str(link["id"]), type_="click", limit=3)
        assert [e["event_id"] for e in page] == [str(c.event_id) for c in reversed(clicks[3:])]

        # the rollback: schema 26's (the index by the link's id again), then the older
        # build's migrate (its schema.sql) makes the index by event id again on every partition
        await rollback_26(conn)
        await conn.execute(V18)
        assert [tuple(r) for r in await conn.fetch(_INDEXES)] == before
