"""`refstream migrate` from schema 17 to 18 on a database holding today's clicks: the
click_burst rule counts from windows per link and address (``click_windows``), and the
index of every click by link and address (``events_click_ip``) goes from every partition.
The rule counts from the upgrade on: a burst that began before it is flagged once it
crosses the threshold after it. The rollback (docs/operations.md): the older build's
migrate makes the index again, and schema 17's count reads it. And from schema 20 to 21:
the windows become byte strings (``burst_windows``), the open ones copied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.contract import jsonrows
from ingest.contract.events import uuid7
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate
from workers.consumer import burst_pass, bursts
from workers.consumer.store import write_batch

from ._migrate import DATA, ROLLBACK_25, old_database, schema_until, scratch
from ._world import BROWSER
from .test_bursts import _click, held

_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name, fraud_thresholds)
      SELECT id, 'Main', '{"burst_clicks": 2}' FROM w RETURNING id, workspace_id)
INSERT INTO links (workspace_id, program_id, code, url)
SELECT workspace_id, id, 'OLD1', 'https://example.com/' FROM p
RETURNING id, workspace_id, program_id
"""
IP = "198.51.100.7"
# what schema 17's worker wrote of a click (its flags aside)
_V17_CLICK = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, visitor_key, dialect, received_at, ip,
                    user_agent, payload)
VALUES ($1, 1, $2, $3, $4, 'h:x', 'biore', $5, $6::inet, $7, '{}')
"""
# docs/operations.md, "Migrating to schema 18", rolling back: the flags on the rows
ROLLBACK = """
INSERT INTO event_flags (event_id, rule, workspace_id, excluded, evidence)
SELECT event_id, 'click_burst', workspace_id, false,
       jsonb_build_object('clicks', burst_clicks + 1, 'threshold_clicks', burst_clicks, 'window_seconds', burst_seconds)
FROM events WHERE burst_clicks IS NOT NULL
ON CONFLICT DO NOTHING;
"""
_CLICK_IP_INDEXES = """
SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE pg_get_indexdef(i.indexrelid) LIKE '%(link_id, ip, received_at)%' ORDER BY 1
"""
# schema 17's count (workers/consumer/fraud.py, then), without its id bounds: one click's
# window by the index
_V17_COUNT = f"""
WITH d (event_id, link_id, ip, at, secs, n_max) AS MATERIALIZED (
    {jsonrows.select(("uuid", "uuid", "inet", "timestamptz", "float8", "int"))}
)
SELECT (SELECT count(*) FROM (
           SELECT 1 FROM events e
            WHERE e.link_id = d.link_id AND e.type = 1 AND e.ip = d.ip AND e.ip IS NOT NULL AND NOT e.test_mode
              AND e.received_at > d.at - make_interval(secs => d.secs) AND e.received_at <= d.at
              AND (e.received_at, e.event_id) <= (d.at, d.event_id)
            ORDER BY e.received_at DESC
            LIMIT d.n_max + 1) c) AS n
FROM d
"""


async def test_a_schema_17_database_with_clicks_takes_the_windows_of_schema_18(
    scratch_url: str, settings: Settings
) -> None:
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 17)
        link = await conn.fetchrow(_WORLD)
        ws = link["workspace_id"]
        now = datetime.now(UTC) - timedelta(seconds=5)
        for i in range(4):  # a burst that began before the upgrade, stored by schema 17's worker
            await conn.execute(
                _V17_CLICK, uuid7(), ws, link["id"], link["program_id"], now + timedelta(milliseconds=i), IP, BROWSER
            )
        before = [r["relname"] for r in await conn.fetch(_CLICK_IP_INDEXES)]
        assert "events" in before and len(before) >= 3  # the partitioned table's, and each partition's
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 18
        assert (await schema_check.check_url(scratch_url)).ok
        assert await conn.fetch(_CLICK_IP_INDEXES) == []
        assert await conn.fetchval("SELECT count(*) FROM click_windows") == 0
        assert await conn.fetchval("SELECT count(*) FROM burst_windows") == 0

        # after it, four clicks from the same address: counted from the upgrade on, the
        # third and fourth cross the threshold of two
        at = int(now.timestamp() * 1000) + 10
        clicks = [_click({"workspace_id": str(ws)}, "OLD1", IP, at + i) for i in range(4)]
        assert (await write_batch(pool, clicks)).inserted == 4
        assert (await burst_pass.run(pool)).flagged == 2  # after the commit (schema 23)
        flagged = await conn.fetch("SELECT event_id, evidence::text FROM click_burst_flags")
        assert sorted((r["event_id"], r["evidence"]) for r in flagged) == sorted(
            (c.event_id, '{"clicks": 3, "window_seconds": 60, "threshold_clicks": 2}') for c in clicks[2:]
        )
        assert await conn.fetchval("SELECT count(*) FROM events WHERE burst_clicks IS NOT NULL") == 0
        # (schema 21's windows: this build's worker writes burst_windows)
        window = await conn.fetchrow("SELECT keep, clicks FROM burst_windows WHERE link_id = $1", link["id"])
        assert window["keep"] == 3 and [i for _, i in held(window["clicks"])] == [c.event_id for c in clicks[1:]]
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
        assert await conn.fetchval("SELECT count(*) FROM burst_windows") == 1

        # the rollback: the flags on the rows (schemas 18 to 22) become event_flags rows, where
        # this build's are already, which schema 17 reads;
        # the older build's migrate (its schema.sql) makes the index again on every
        # partition, and schema 17's count reads the eight clicks through it
        await conn.execute(ROLLBACK_25)  # schema 25's first: its flags rows of event_flags
        await conn.execute(ROLLBACK)
        await conn.execute((DATA / "schema_v17.sql").read_text())
        moved = await conn.fetch("SELECT event_id, evidence FROM event_flags WHERE rule = 'click_burst'")
        assert sorted((r["event_id"], r["evidence"]) for r in moved) == sorted(
            (c.event_id, '{"clicks": 3, "window_seconds": 60, "threshold_clicks": 2}') for c in clicks[2:]
        )
        assert [r["relname"] for r in await conn.fetch(_CLICK_IP_INDEXES)] == before
        one = (uuid7(), link["id"], IP, datetime.fromtimestamp((at + 5) / 1000, UTC), 60.0, 20)
        assert await conn.fetchval(_V17_COUNT, jsonrows.doc([one])) == 8
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {_V17_COUNT}", jsonrows.doc([one])))
        assert "link_id_ip_received_at_idx" in plan, plan


# what schema 20's worker left of a pair's clicks (workers/consumer/bursts.py, then)
_V20_WINDOW = """
INSERT INTO click_windows (link_id, ip, keep, until, ats, ids) VALUES ($1, $2::inet, 3, $3, $4::bigint[], $5::uuid[])
"""
_COLUMNS = """
SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
FROM pg_attribute WHERE attrelid = 'click_windows'::regclass AND attnum > 0 AND NOT attisdropped
"""


async def test_a_schema_20_database_copies_its_open_windows_into_the_byte_strings_of_schema_21(
    scratch_url: str, settings: Settings
) -> None:
    """`refstream migrate` from 20 to 21 while a burst is under way: the window still open
    is copied (its entries in (time, id) order), so the burst's next click is flagged across
    the upgrade; one past its time is not, and the worker's prune deletes it from schema 20's
    table. The rollback (docs/operations.md): schema 20's build runs on the same database,
    its table as it was."""
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 20, schema_until(20))
        link = await conn.fetchrow(_WORLD)
        ws = link["workspace_id"]
        now = datetime.now(UTC) - timedelta(seconds=5)
        at = int(now.timestamp() * 1000)
        ids = [uuid7(), uuid7()]
        for i, event_id in enumerate(ids):  # two clicks of a burst, stored by schema 20's worker
            await conn.execute(
                _V17_CLICK, event_id, ws, link["id"], link["program_id"], now + timedelta(milliseconds=i), IP, BROWSER
            )
        # out of (time, id) order in the arrays' text on purpose: the copy sorts them
        await conn.execute(_V20_WINDOW, link["id"], IP, now + timedelta(seconds=60), [at + 1, at], ids[::-1])
        gone = "198.51.100.8"  # a window past its time: not copied, and pruned
        await conn.execute(_V20_WINDOW, link["id"], gone, now - timedelta(seconds=1), [at - 90_000], [uuid7()])
        columns = await conn.fetchval(_COLUMNS)

        assert await migrate(conn) == SCHEMA_VERSION >= 21
        assert (await schema_check.check_url(scratch_url)).ok
        copied = await conn.fetch("SELECT host(ip) AS ip, keep, clicks FROM burst_windows")
        assert [(r["ip"], r["keep"]) for r in copied] == [(IP, 3)]
        assert held(copied[0]["clicks"]) == [(at, ids[0]), (at + 1, ids[1])]
        assert await migrate(conn) == SCHEMA_VERSION  # a second run copies nothing again
        assert await conn.fetchval("SELECT clicks FROM burst_windows") == copied[0]["clicks"]

        # the burst's third click, after the upgrade, crosses the threshold of two
        third = _click({"workspace_id": str(ws)}, "OLD1", IP, at + 10)
        assert (await write_batch(pool, [third])).inserted == 1
        assert (await burst_pass.run(pool)).flagged == 1
        evidence = await conn.fetchval(
            "SELECT evidence::text FROM click_burst_flags WHERE event_id = $1", third.event_id
        )
        assert evidence == '{"clicks": 3, "window_seconds": 60, "threshold_clicks": 2}'
        window = await conn.fetchval("SELECT clicks FROM burst_windows WHERE host(ip) = $1", IP)
        assert held(window) == [(at, ids[0]), (at + 1, ids[1]), (at + 10, third.event_id)]
        async with pool.acquire() as c:
            assert await bursts.prune(c) == 1
        assert [r["ip"] for r in await conn.fetch("SELECT host(ip) AS ip FROM click_windows")] == [IP]

        # the rollback: schema 20's build migrates (its schema.sql) and finds its table as it was
        await conn.execute(schema_until(20))
        assert await conn.fetchval(_COLUMNS) == columns
