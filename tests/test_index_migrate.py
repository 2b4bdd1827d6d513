"""`refstream migrate` from schema 13 to 14, on a database holding rows of today's schema:
two indexes no read needs are dropped, two that held every click are replaced by partial
ones built online (ON ONLY the partitioned table, then CONCURRENTLY on each partition,
attached), and every read that went by them answers as before."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from ingest.contract import clicks
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.settings import Settings
from ingest.manage import manage, online, schema_check
from ingest.manage.db import SCHEMA_VERSION, ensure_database, migrate, schema_sql
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_late
from workers.consumer.partitions import maintain
from workers.consumer.store import write_batch

from ._migrate import old_database, scratch

V13 = Path(__file__).parent / "data" / "schema_v13.sql"
AHEAD = re.compile(
    r"CREATE TABLE IF NOT EXISTS (click_windows|event_agents|burst_windows|burst_pending) \(.*?\n\);", re.S
)

_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name) SELECT id, 'Main' FROM w RETURNING id, workspace_id),
a AS (INSERT INTO affiliates (workspace_id, program_id, external_id)
      SELECT workspace_id, id, 'u1' FROM p RETURNING id, workspace_id, program_id)
INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)
SELECT workspace_id, program_id, id, c, 'https://example.com/' FROM a, unnest('{OLD1,OLD2}'::text[]) c
RETURNING id, workspace_id, code
"""
_INDEXES = """
SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = 'events'::regclass ORDER BY 1
"""
# each partition's copy of a partitioned index, by the partitioned index's name
_ATTACHED = """
SELECT h.inhparent::regclass::text AS parent, x.indrelid::regclass::text AS partition
FROM pg_inherits h JOIN pg_index x ON x.indexrelid = h.inhrelid
WHERE h.inhparent = $1::regclass ORDER BY 2
"""
# schema 14's, and schema 20's events_workspace_click
DROPPED = {
    "events_received",
    "events_lead_customer",
    "events_workspace_type_id",
    "events_workspace_visitor",
    "events_workspace_click",
}


def _traffic(workspace: str) -> tuple[list[Envelope], dict[str, Any]]:
    """Clicks of three kinds (Affitor with a visitor, bio.re without, native), a person's
    lead and conversion, another person's lead: what the reads below look for."""
    out: list[Envelope] = []
    click = uuid7()
    cid = clicks.mint(click)
    for i in range(30):
        code = ("OLD1", "OLD2")[i % 2]
        out.append(
            Envelope(
                EventType.CLICK,
                Dialect.AFFITOR,
                {"code": code, "click_id": clicks.mint(uuid7()), "visitor_id": f"v{i}"},
                workspace,
                "81.2.69.160",
            )
        )
        out.append(Envelope(EventType.CLICK, Dialect.BIORE, {"code": code}, workspace, f"81.2.69.{i}", "Mozilla/5.0"))
    out.append(
        Envelope(
            EventType.CLICK,
            Dialect.AFFITOR,
            {"code": "OLD1", "click_id": cid, "visitor_id": "vp"},
            workspace,
            event_id=click,
        )
    )
    person = {"code": "OLD1", "click_id": cid, "visitor_id": "vp", "name": "Sign Up", "external_id": "cus_p"}
    out.append(Envelope(EventType.LEAD, Dialect.REFPORT, person, workspace))
    other = {"code": "OLD2", "visitor_id": "v3", "name": "Sign Up", "external_id": "cus_q"}
    out.append(Envelope(EventType.LEAD, Dialect.REFPORT, other, workspace))
    out.append(
        Envelope(EventType.CONVERSION, Dialect.BRICQS, {"code": "OLD1", "visitor_id": "vp", "dedupe": "d1"}, workspace)
    )
    return out, {"click": click}


async def _answers(conn: asyncpg.Connection, workspace: str, link: str, click: uuid.UUID) -> dict[str, Any]:
    """Every read that went by a replaced or dropped index, answered."""
    out: dict[str, Any] = {}
    for type_ in (None, "click", "lead", "conversion"):
        for link_id in (None, link):
            # GET /v1/events' statement, its ids only (its enrichment is read by a function
            # of schema 16, which a schema 13 database lacks; the plan is the same)
            query = manage.events_query(
                link=link_id is not None, type_=type_ is not None, clicks=type_ in (None, "click")
            )
            query = query.replace(manage._EVENT_COLUMNS, "event_id", 1)
            args: list[Any] = [uuid.UUID(workspace)]
            args += [uuid.UUID(link_id)] if link_id is not None else []
            args += [{"click": 1, "lead": 2, "conversion": 3}[type_]] if type_ is not None else []
            rows = await conn.fetch(query, *args, 100)
            out[f"events {type_} {link_id is not None}"] = [str(r["event_id"]) for r in rows]
    floor = pg_erasure.uuid_floor(datetime(2000, 1, 1, tzinfo=UTC))
    identify = await conn.fetchrow(pg_erasure._IDENTIFY, uuid.UUID(workspace), "cus_p")
    out["identify"] = (sorted(identify["visitors"]), sorted(identify["clicks"]), identify["since"])
    # the erasure's look, its ids only (its User-Agent is read by a function of schema 20)
    look = re.sub(
        r"^SELECT .*?\nFROM events", "SELECT event_id FROM events", pg_erasure._EVENTS.strip(), count=1, flags=re.S
    )
    found = await conn.fetch(look, uuid.UUID(workspace), "cus_p", ["vp", "v3"], [click], floor)
    out["erasure"] = sorted(r["event_id"] for r in found)
    out["sweep"] = [r["event_id"] for r in await conn.fetch(erasure_late._RAW, uuid.UUID(workspace), floor, 1000)]
    return out


async def test_a_schema_13_database_with_rows_takes_schema_14_online(scratch_url: str, settings: Settings):
    async with scratch(scratch_url, settings) as (conn, pool):
        await old_database(conn, 13)
        links = {r["code"]: r for r in await conn.fetch(_WORLD)}
        workspace, link = str(links["OLD1"]["workspace_id"]), str(links["OLD1"]["id"])
        envelopes, known = _traffic(workspace)
        # the rows as this build's worker writes them: it names events.device_id (schema
        # 16), place_id (17), burst_clicks and burst_seconds (18), agent_id (20), which alone
        # are added ahead (nullable: rows without them are schema 13's own), merges its
        # clicks into burst_windows (21), leaves them to judge in burst_pending (23) and its
        # User-Agents into event_agents (20), made ahead as well
        await conn.execute(
            "ALTER TABLE events ADD COLUMN device_id integer, ADD COLUMN place_id integer,"
            " ADD COLUMN burst_clicks integer, ADD COLUMN burst_seconds integer, ADD COLUMN agent_id integer"
        )
        for made in AHEAD.finditer(schema_sql()):
            await conn.execute(made.group(0))
        done = await write_batch(pool, envelopes)
        assert done.inserted == len(envelopes)
        before = await _answers(conn, workspace, link, known["click"])
        assert len(before["events None False"]) == len(envelopes)
        assert len(before["events lead False"]) == 2 and len(before["events conversion False"]) == 1
        assert len(before["erasure"]) == 5  # the person's click, lead, conversion; v3's click and lead
        assert DROPPED <= {r["relname"] for r in await conn.fetch(_INDEXES)}
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION
        indexes = {r["relname"]: r["indisvalid"] for r in await conn.fetch(_INDEXES)}
        assert not DROPPED & set(indexes)
        assert all(indexes[name] for name in online.REPLACES)
        partitions = [r["partition"] for r in await conn.fetch(_ATTACHED, "events_workspace_id")]
        assert len(partitions) > 2  # the default and the days maintain made
        for name in online.REPLACES:
            attached = await conn.fetch(_ATTACHED, name)
            assert [r["partition"] for r in attached] == partitions
        # built concurrently, each under its own name beside its partition
        names = {r["relname"] for r in await conn.fetch("SELECT relname FROM pg_class WHERE relkind = 'i'")}
        assert {online.partition_index(p, "events_workspace_nonclick", "events") for p in partitions} <= names
        assert await _answers(conn, workspace, link, known["click"]) == before
        assert (await schema_check.check_url(scratch_url)).ok

        # a second run builds nothing; a partition made later gets both at once
        assert await migrate(conn) == SCHEMA_VERSION
        assert await online.build(conn) == []
        await conn.execute(
            "CREATE TABLE events_later PARTITION OF events FOR VALUES FROM ('ffff0000-0000-7000-8000-000000000000')"
            " TO ('ffff1000-0000-7000-8000-000000000000')"
        )
        for name in online.REPLACES:
            assert "events_later" in [r["partition"] for r in await conn.fetch(_ATTACHED, name)]
        # and the worker stores into the migrated table as before (the leads' and the
        # conversion's dedupe keys are the first traffic's: a second one is a duplicate)
        more, _ = _traffic(workspace)
        done = await write_batch(pool, more)
        assert (done.inserted, done.duplicates) == (len(more) - 3, 3)


async def test_an_interrupted_build_is_taken_up_again(scratch_url: str):
    """A partition's copy left invalid (a CONCURRENTLY build cancelled) is dropped and built
    again by the next run; the replaced index stays until the new one is valid."""
    await ensure_database(scratch_url)
    conn = await asyncpg.connect(scratch_url)
    try:
        await conn.execute(V13.read_text())
        await maintain(conn, retention_days=3, dedupe_days=6)
        async with conn.transaction():  # schema 14's statements, without the build after them
            from ingest.manage.db import schema_sql

            await conn.execute(schema_sql())
        assert not await conn.fetchval(online._VALID, "events_workspace_nonclick")
        partition = "events_default"
        name = online.partition_index(partition, "events_workspace_nonclick", "events")
        await conn.execute(f"CREATE INDEX {name} ON {partition} (workspace_id, type, event_id) WHERE type <> 1")
        # as a cancelled CREATE INDEX CONCURRENTLY leaves it (the catalog's flag, as superuser)
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass", name)
        assert await conn.fetchval(online._VALID, "events_workspace_type_id")  # still there meanwhile
        made = await online.build(conn)
        assert name in made
        assert await conn.fetchval(online._VALID, name)
        assert await conn.fetchval(online._VALID, "events_workspace_nonclick")
        assert await conn.fetchval(online._VALID, "events_workspace_type_id") is None
    finally:
        await conn.close()
