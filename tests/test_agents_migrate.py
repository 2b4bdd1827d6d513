"""`refstream migrate` from schema 19 to 20 on a database holding today's clicks.

- A row's User-Agent moves to `event_agents`, named by the row's `agent_id`. Rows written
  before keep their text and read as they did; rows written after name an entry, one per
  text, and read the same through `event_user_agent`; an erasure takes the name off the
  person's rows; the rollback (docs/operations.md) writes every text back into its rows,
  and schema 19's reader of the column then reads them all.
- A click's payload is stored without its click id and visitor id, which its columns hold,
  and `event_payload` puts them back; the rollback puts them back into the rows.
- `events_workspace_click` is replaced, online, by `events_workspace_named_click`, without
  the clicks whose click id is their own: an erasure still finds every event naming the
  person's click (a repeat click carrying it, their lead), and the click by its id."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson

from ingest.contract import clicks
from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import online, schema_check
from ingest.manage.db import SCHEMA_VERSION, migrate
from ingest.privacy import erasure as pg_erasure
from workers.consumer.store import write_batch

from ._migrate import DATA, old_database, scratch
from ._world import BROWSER
from .faults._checks import Checker
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
    UPDATE events e SET user_agent = event_user_agent(e.user_agent, e.agent_id), agent_id = NULL,
        payload = CASE WHEN e.payload ? 'code' THEN e.payload
                       ELSE event_payload_ids(e.payload, e.click_id, e.visitor_id) END
    FROM page WHERE e.event_id = page.event_id
      AND (e.agent_id IS NOT NULL
           OR NOT e.payload ? 'code' AND e.payload <> event_payload_ids(e.payload, e.click_id, e.visitor_id))
)
SELECT event_id FROM page ORDER BY event_id DESC LIMIT 1
"""
# schema 19's read (GET /v1/events then): the column as it is
_V19_READ = (
    "SELECT event_id, user_agent, event_payload(payload, link_id, referrer)::text AS payload FROM events"
    " WHERE workspace_id = $1"
)
# the valid indexes by click id, and the partitions each is on
_BY_CLICK = """
SELECT c.relname AS index, count(h.inhrelid) AS partitions FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_inherits h ON h.inhparent = c.oid
WHERE c.relname IN ('events_workspace_click', 'events_workspace_named_click') AND i.indisvalid
GROUP BY 1 ORDER BY 1
"""
_PARTITIONS = "SELECT count(*) FROM pg_partition_tree('events') WHERE isleaf"


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
        partitions = await conn.fetchval(_PARTITIONS)
        assert [tuple(r) for r in await conn.fetch(_BY_CLICK)] == [("events_workspace_click", partitions)]

        assert await migrate(conn) == SCHEMA_VERSION >= 20
        assert (await schema_check.check_url(scratch_url)).ok
        # built on every partition, attached, and the one it replaces dropped
        assert [tuple(r) for r in await conn.fetch(_BY_CLICK)] == [("events_workspace_named_click", partitions)]
        assert online.REPLACES["events_workspace_named_click"] == "events_workspace_click"
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
        answers = await _api(pool, ws)
        read = {k: r["user_agent"] for k, r in answers.items()}
        assert read == {str(k): v for k, v in old.items()} | {str(e.event_id): e.user_agent for e in new}
        # a click's payload is stored without its click id and visitor id (its columns'),
        # and reads back as the client sent it
        stored = await conn.fetch(
            "SELECT payload::text FROM events WHERE event_id = ANY($1::uuid[])", [e.event_id for e in new]
        )
        assert len(stored) == 4 and not any({"click_id", "visitor_id"} & set(orjson.loads(r[0])) for r in stored)
        assert all(answers[str(e.event_id)]["payload"] == e.payload for e in new)
        assert await migrate(conn) == SCHEMA_VERSION  # a second run changes nothing
        assert await conn.fetchval("SELECT count(*) FROM event_agents") == 3

        # a person's first click, a repeat click carrying its id (another visitor id, so
        # only the click id names it) and their lead naming it: the index holds the two
        # that name another's click, and the erasure finds all three
        first = _new_click(ws, "vp", ("81.2.69.160", BROWSER, None))
        repeat = _new_click(ws, "vq", ("81.2.69.161", BROWSER, None))
        repeat.payload["click_id"] = clicks.mint(first.event_id)
        lead = {"code": "OLD1", "click_id": clicks.mint(first.event_id), "visitor_id": "vp", "external_id": "cus_p"}
        person = [first, repeat, Envelope(EventType.LEAD, Dialect.REFPORT, lead | {"name": "Sign Up"}, ws)]
        assert (await write_batch(pool, person)).inserted == 3
        named = await conn.fetch(
            "SELECT event_id FROM events WHERE click_id = $1 AND click_id <> event_id", first.event_id
        )
        assert sorted(r["event_id"] for r in named) == sorted(e.event_id for e in person[1:])
        ledger.forget_salt()  # the process's salt is this database's for the erasure, then no one's
        try:
            await pg_erasure.erase(pool, ws, "cus_p", by="test", archive_days=30)
        finally:
            ledger.forget_salt()
        scrubbed = await conn.fetch(
            "SELECT event_id, ip, user_agent, agent_id FROM events WHERE event_id = ANY($1::uuid[])",
            [e.event_id for e in person],
        )
        assert len(scrubbed) == 3 and all(r["ip"] is r["user_agent"] is r["agent_id"] is None for r in scrubbed)
        # the clicks' payloads read back with their click id and their visitor's pseudonym
        erased = await _api(pool, ws)
        for e in person[:2]:
            payload = erased[str(e.event_id)]["payload"]
            assert payload["click_id"] == clicks.mint(first.event_id)
            assert ledger.is_pseudonym(payload["visitor_id"]) and payload["visitor_id"] != e.payload["visitor_id"]
        assert await conn.fetchval("SELECT count(*) FROM event_agents") == 3  # the entry is the others' too

        # the rollback: every text back into its rows, page by page; the older build's
        # migrate (its schema.sql) runs, and schema 19's reader reads every row's text
        last = uuid.UUID(int=0)
        while (last := await conn.fetchval(ROLLBACK, last)) is not None:
            pass
        await conn.execute((DATA / "schema_v19.sql").read_text())
        assert await conn.fetchval("SELECT count(*) FROM events WHERE agent_id IS NOT NULL") == 0
        rows = await conn.fetch(_V19_READ, link["workspace_id"])
        back = {r["event_id"]: r["user_agent"] for r in rows}
        assert back == old | {e.event_id: e.user_agent for e in new} | dict.fromkeys(e.event_id for e in person)
        # and schema 19's payload read gives each click's as the client sent it
        payloads = {r["event_id"]: orjson.loads(r["payload"]) for r in rows}
        assert all(payloads[e.event_id] == e.payload for e in new)
        assert payloads[repeat.event_id]["click_id"] == clicks.mint(first.event_id)


async def test_the_fault_checker_flags_a_row_that_does_not_read_back_whole(
    scratch_url: str, settings: Settings, keys: Keys, tmp_path: Path
) -> None:
    # the generative test's read-back invariant (tests/faults/_checks.py), on rows written
    # by this build and then broken the two ways it looks for
    async with scratch(scratch_url, settings) as (conn, pool):
        await migrate(conn)
        link = await conn.fetchrow(_WORLD)
        ws = str(link["workspace_id"])
        sent = [_new_click(ws, f"v{i}", ("81.2.69.160", BROWSER, None)) for i in range(3)]
        assert (await write_batch(pool, sent)).inserted == 3
        check = Checker(scratch_url, settings.redis_url, keys, tmp_path)
        try:
            assert await check.read_back_problems() == []
            await conn.execute("UPDATE events SET agent_id = agent_id + 1000 WHERE event_id = $1", sent[0].event_id)
            await conn.execute(
                "UPDATE events SET payload = payload || jsonb_build_object('click_id', $2::text) WHERE event_id = $1",
                sent[1].event_id,
                clicks.mint(sent[2].event_id),
            )
            found = await check.read_back_problems()
            assert [p.split()[1] for p in found] == sorted(str(e.event_id) for e in sent[:2])
        finally:
            await check.close()
