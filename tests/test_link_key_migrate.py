"""`refstream migrate` from schema 25 to 26 on a database holding today's events: the index
of a link's events by time goes from (``link_id``, ``received_at``) to the link's 8-byte key
(``events_link_key_received``), built online on every partition, and the old one is dropped
once the new one is valid. The reads by link find the same events before, after, and after
the rollback (docs/operations.md "Migrating to schema 26"), which also writes a click's
referrer domain back into its row; a later partition gets the new index at once; a new
database never makes the old one."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from ingest.contract.settings import Settings
from ingest.manage import manage, online, schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate
from ingest.privacy import erasure_rows
from workers.consumer import drops
from workers.consumer.enrich import Enricher
from workers.consumer.partitions import maintain
from workers.consumer.store import write_batch
from workers.ops import reconcile

from ._migrate import old_database, rollback_26, schema_until, scratch
from .test_bursts import _click

_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name) SELECT id, 'Main' FROM w RETURNING id, workspace_id)
INSERT INTO links (workspace_id, program_id, code, url)
SELECT workspace_id, id, code, 'https://example.com/' FROM p CROSS JOIN unnest('{KEY1,KEY2,KEY3}'::text[]) code
RETURNING id, workspace_id, code
"""
# every index of events and its partitions that reads a link's events by time: (table, by key, valid)
_INDEXES = """
SELECT c.relname AS table, pg_get_indexdef(i.indexrelid) LIKE '%uuid_hash_extended(link_id%' AS by_key,
       i.indisvalid AS valid
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE pg_get_indexdef(i.indexrelid) ~ '\\((uuid_hash_extended\\()?link_id(, \\(0\\)::bigint\\))?, received_at\\)'
  AND c.relname LIKE 'events%'
ORDER BY 1, 2
"""


async def _reads(conn: asyncpg.Connection, ws: str, links: list[Any], at: datetime) -> tuple[Any, ...]:
    """What each read by link answers: a link's newest, reconcile's counts of the three
    links' days, and the erasure's look for shared visitor keys."""
    newest = manage.events_query(link=True, type_=False).replace(manage._EVENT_COLUMNS, "event_id")
    page = await conn.fetch(newest, ws, links[0], 50)
    edges = (at - timedelta(hours=1), at + timedelta(hours=1))
    async with conn.transaction():
        await conn.execute(reconcile._DAYS, links, *edges, erasure_rows.uuid_floor(edges[0]))
        days = sorted(tuple(r) for r in await conn.fetch("SELECT link_id, day, clicks FROM reconcile_days"))
        await conn.execute(drops._TRUTH, links, *edges, erasure_rows.uuid_floor(edges[0]))
    keys = await conn.fetch("SELECT DISTINCT visitor_key FROM events WHERE link_id = ANY($1)", links)
    shared = await conn.fetch(erasure_rows._SHARED_KEYS, links, [k[0] for k in keys], [])
    return [e["event_id"] for e in page], days, sorted(tuple(r) for r in shared)


async def test_a_schema_25_database_reads_a_links_events_by_their_key_after_migrate_and_rollback(
    scratch_url: str, settings: Settings
) -> None:
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 25, schema_until(25))
        rows = await conn.fetch(_WORLD)
        ws, links = str(rows[0]["workspace_id"]), [r["id"] for r in rows]
        now = datetime.now(UTC) - timedelta(seconds=30)
        at = int(now.timestamp() * 1000)
        clicks = [
            _click({"workspace_id": ws}, r["code"], f"198.51.100.{i}", at + 10 * i) for i, r in enumerate(rows * 20)
        ]
        assert (await write_batch(pool, clicks)).inserted == 60
        before = [tuple(r) for r in await conn.fetch(_INDEXES)]
        tables = sorted({t for t, _, _ in before})
        assert len(tables) >= 3 and before == [(t, False, True) for t in tables]
        answered = await _reads(conn, ws, links, now)
        assert len(answered[0]) == 20 and sum(d[2] for d in answered[1]) == 60 and answered[2]

        assert await migrate(conn) == SCHEMA_VERSION >= 26
        assert (await schema_check.check_url(scratch_url)).ok
        # on every partition, valid, and the old one gone from each
        assert [tuple(r) for r in await conn.fetch(_INDEXES)] == [(t, True, True) for t in tables]
        assert await _reads(conn, ws, links, now) == answered
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
        assert not await online.build(conn)
        # a partition made after it has the new index
        await maintain(conn, retention_days=30, dedupe_days=60, today=date.today() + timedelta(days=5))
        after = [tuple(r) for r in await conn.fetch(_INDEXES)]
        assert {t for t, _, _ in after} > set(tables) and all(by_key and valid for _, by_key, valid in after)
        # a click of schema 26's form: its referrer's domain derived, not in its row
        late = _click({"workspace_id": ws}, "KEY1", "198.51.100.99", at + 5_000)
        late.payload["referrer"] = "https://www.bio.re/alex"
        assert (await write_batch(pool, [late], Enricher())).inserted == 1
        assert await conn.fetchval("SELECT enrichment FROM events WHERE event_id = $1", late.event_id) is None
        page = await manage.list_events(conn, ws, link_id=str(links[0]), type_=None, limit=50)
        assert len(page) == 21 and page[0]["event_id"] == str(late.event_id)

        # the rollback: the index by the link's id again, the key's gone
        await rollback_26(conn)
        await conn.execute(schema_until(25))
        doc = await conn.fetchval("SELECT enrichment::text FROM events WHERE event_id = $1", late.event_id)
        assert doc == '{"referrer_domain": "bio.re"}'
        assert all(not by_key and valid for _, by_key, valid in await conn.fetch(_INDEXES))
        assert await conn.fetchval("SELECT count(*) FROM events WHERE link_id = $1", links[0]) == 21


async def test_a_new_database_makes_only_the_index_by_key(scratch_url: str, settings: Settings) -> None:
    async with scratch(scratch_url, settings) as (conn, _pool):
        assert await migrate(conn) == SCHEMA_VERSION
        found = [tuple(r) for r in await conn.fetch(_INDEXES)]
        assert found and all(by_key and valid for _, by_key, valid in found)
        assert await conn.fetchval("SELECT to_regclass('events_link_received')") is None
