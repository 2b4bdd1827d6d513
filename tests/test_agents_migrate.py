"""`refstream migrate` from schema 19 to 20 on a database holding today's clicks: a row's
User-Agent moves to `event_agents`, named by the row's `agent_id`. Rows written before keep
their text and read as they did; rows written after name an entry, one per text, and read
the same through `event_user_agent`; the rollback (docs/operations.md) writes every text
back into its rows, and schema 19's reader of the column then reads them all."""

from __future__ import annotations

import uuid

from ingest.contract.events import uuid7
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate
from workers.consumer.store import write_batch

from ._migrate import DATA, old_database, scratch
from ._world import BROWSER
from .test_enrichment_migrate import _WORLD, GOOGLEBOT, _api, _new_click

# a User-Agent as long as the edge keeps (REFSTREAM_MAX_STRING_LENGTH), of two-byte
# characters: 4 KB of UTF-8, more than a btree entry of its text could hold
LONG = "Mozilla/5.0 " + "é" * 2036
# what schema 19's worker wrote of a click, the parts this test reads
_V19_CLICK = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, visitor_key, dialect, received_at, ip,
                    user_agent, payload)
VALUES ($1, 1, $2, $3, $4, 'h:x', 'biore', now(), '198.51.100.7', $5, '{}')
"""
# docs/operations.md, "Migrating to schema 20", rolling back: one page of it
ROLLBACK = """
WITH page AS (
    SELECT event_id FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000
), done AS (
    UPDATE events e SET user_agent = a.ua, agent_id = NULL
    FROM page, event_agents a WHERE e.event_id = page.event_id AND a.id = e.agent_id
)
SELECT event_id FROM page ORDER BY event_id DESC LIMIT 1
"""
# schema 19's read (GET /v1/events then): the column as it is
_V19_READ = "SELECT event_id, user_agent FROM events WHERE workspace_id = $1"


async def test_a_schema_19_database_with_clicks_takes_the_agents_of_schema_20(
    scratch_url: str, settings: Settings
) -> None:
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 19)
        link = await conn.fetchrow(_WORLD)
        ws = str(link["workspace_id"])
        old: dict[uuid.UUID, str | None] = {}
        for ua in (BROWSER, GOOGLEBOT, LONG, None):
            old[eid := uuid7()] = ua
            await conn.execute(_V19_CLICK, eid, link["workspace_id"], link["id"], link["program_id"], ua)
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 20
        assert (await schema_check.check_url(scratch_url)).ok
        # the rows written before keep their text, and read as they did
        assert {k: r["user_agent"] for k, r in (await _api(pool, ws)).items()} == {str(k): v for k, v in old.items()}
        assert await conn.fetchval("SELECT count(*) FROM event_agents") == 0

        # after it: the same texts and a new one, each row naming its text's one entry
        new = [_new_click(ws, f"v{i}", ("81.2.69.160", ua, None)) for i, ua in enumerate((BROWSER, LONG, BROWSER))]
        new.append(_new_click(ws, "v9", ("81.2.69.160", "Tracker/2.0", None)))
        assert (await write_batch(pool, new)).inserted == len(new)
        rows = await conn.fetch(
            "SELECT event_id, user_agent, agent_id FROM events WHERE event_id = ANY($1::uuid[])",
            [e.event_id for e in new],
        )
        assert all(r["user_agent"] is None and r["agent_id"] is not None for r in rows)
        by_id = {r["event_id"]: r["agent_id"] for r in rows}
        assert by_id[new[0].event_id] == by_id[new[2].event_id] != by_id[new[1].event_id]
        entries = {r["id"]: r["ua"] for r in await conn.fetch("SELECT id, ua FROM event_agents")}
        assert sorted(entries.values()) == sorted({BROWSER, LONG, "Tracker/2.0"})
        read = {k: r["user_agent"] for k, r in (await _api(pool, ws)).items()}
        assert read == {str(k): v for k, v in old.items()} | {str(e.event_id): e.user_agent for e in new}
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
        assert await conn.fetchval("SELECT count(*) FROM event_agents") == 3

        # the rollback: every text back into its rows, page by page; the older build's
        # migrate (its schema.sql) runs, and schema 19's reader reads every row's text
        last = uuid.UUID(int=0)
        while (last := await conn.fetchval(ROLLBACK, last)) is not None:
            pass
        await conn.execute((DATA / "schema_v19.sql").read_text())
        assert await conn.fetchval("SELECT count(*) FROM events WHERE agent_id IS NOT NULL") == 0
        back = {r["event_id"]: r["user_agent"] for r in await conn.fetch(_V19_READ, link["workspace_id"])}
        assert back == old | {e.event_id: e.user_agent for e in new}
