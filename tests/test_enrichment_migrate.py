"""`refstream migrate` from schema 15 to 16 on a database holding today's rows: a click's
device and the enrichment's versions move to `event_devices`, the row keeps what only it
tells. Rows written before keep their whole document and are read as they are; rows
written after read the same through `event_enrichment`; an erasure scrubs either; and the
rollback (docs/operations.md) gives every row its whole document back."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks
from ingest.contract import erasure as ledger
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.settings import Settings
from ingest.manage import manage, schema_check
from ingest.manage.db import SCHEMA_VERSION, ensure_database, migrate
from ingest.privacy import erasure as pg_erasure
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch

from ._migrate import old_database
from ._world import BROWSER

_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name) SELECT id, 'Main' FROM w RETURNING id, workspace_id),
a AS (INSERT INTO affiliates (workspace_id, program_id, external_id)
      SELECT workspace_id, id, 'u1' FROM p RETURNING id, workspace_id, program_id)
INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)
SELECT workspace_id, program_id, id, 'OLD1', 'https://example.com/' FROM a
RETURNING id, workspace_id, program_id, affiliate_id
"""
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
# (address, User-Agent, referrer): a browser in GB, an IPv6 visitor, an address Postgres
# writes otherwise than Python (IPv4-compatible IPv6), a crawler, a datacenter, no referrer
CLICKS = [
    ("81.2.69.160", BROWSER, "https://news.example/a"),
    ("2a02:8108:1:2::1", BROWSER, "https://www.google.com/"),
    ("::102:304", BROWSER, None),
    ("81.2.69.161", GOOGLEBOT, "https://t.co/x"),
    ("8.8.8.8", BROWSER, None),
]
# GET /v1/events' columns as schema 15 read them: the row's document as it is
_V15_EVENTS = (
    "SELECT event_id, type, link_id, program_id, affiliate_id, click_id, visitor_id, customer_external_id, name,"
    " dialect, test_mode, is_bot, bot_counted, received_at, processed_at, ip, user_agent, referrer, country, asn,"
    " enrichment, payload FROM events WHERE workspace_id = $1 ORDER BY event_id DESC"
)
# what schema 15's worker wrote of a browser's click (workers/consumer/store.py, then)
_V15_INSERT = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, affiliate_id, click_id, visitor_id,
                    visitor_key, dialect, is_bot, received_at, ip, user_agent, referrer, country, asn,
                    enrichment, payload)
VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $7, 'affitor', $8, now(), $9::inet, $10, $11, $12, $13, $14::text::jsonb,
        $15::text::jsonb)
"""
# docs/operations.md, "Migrating to schema 16", rolling back: one page of it
ROLLBACK = """
WITH page AS (
    SELECT event_id FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000
), done AS (
    UPDATE events e
    SET enrichment = event_enrichment(e.enrichment, e.device_id, e.ip, e.country, e.asn, e.is_bot), device_id = NULL
    FROM page WHERE e.event_id = page.event_id AND e.device_id IS NOT NULL
)
SELECT event_id FROM page ORDER BY event_id DESC LIMIT 1
"""


def _payload(code: str, cid: str, visitor: str, referrer: str | None) -> dict[str, Any]:
    return {"code": code, "click_id": cid, "visitor_id": visitor} | ({"referrer": referrer} if referrer else {})


async def _v15_click(
    conn: asyncpg.Connection, enricher: Enricher, link: asyncpg.Record, visitor: str, click: tuple[str, str, str | None]
) -> uuid.UUID:
    ip, ua, referrer = click
    found = enricher.enrich_row(ip, ua, referrer)
    eid = uuid7()
    await conn.execute(
        _V15_INSERT,
        eid,
        link["workspace_id"],
        link["id"],
        link["program_id"],
        link["affiliate_id"],
        eid,
        visitor,
        found.is_bot,
        found.ip,
        ua,
        referrer,
        found.country,
        found.asn,
        orjson.dumps(found.doc).decode(),
        orjson.dumps(_payload("OLD1", clicks.mint(eid), visitor, referrer)).decode(),
    )
    return eid


def _new_click(workspace: str, visitor: str, click: tuple[str, str, str | None]) -> Envelope:
    ip, ua, referrer = click
    cid = clicks.mint(eid := uuid7())
    return Envelope(EventType.CLICK, Dialect.AFFITOR, _payload("OLD1", cid, visitor, referrer), workspace, ip, ua, eid)


async def _api(pool: asyncpg.Pool, workspace: str) -> dict[str, dict[str, Any]]:
    """GET /v1/events' answer (through the pool: its jsonb codec, as the edge's)."""
    async with pool.acquire() as conn:
        rows = await manage.list_events(conn, workspace, link_id=None, type_=None, limit=100)
    return {r["event_id"]: r for r in rows}


_SAME = ("ip", "user_agent", "referrer", "country", "asn", "is_bot", "enrichment")


async def test_a_schema_15_database_with_rows_takes_schema_16(scratch_url: str, settings: Settings):
    await ensure_database(scratch_url)
    ledger.forget_salt()
    conn = await asyncpg.connect(scratch_url)
    pool = await create_pg_pool(settings.model_copy(update={"database_url": scratch_url}), min_size=1, max_size=2)
    enricher = Enricher()
    try:
        await old_database(conn, 15)
        link = await conn.fetchrow(_WORLD)
        workspace = str(link["workspace_id"])
        old = [await _v15_click(conn, enricher, link, f"vo{i}", c) for i, c in enumerate(CLICKS)]
        person = await _v15_click(conn, enricher, link, "vp", CLICKS[0])
        before = {str(r["event_id"]): manage.row_json(r) for r in await pool.fetch(_V15_EVENTS, link["workspace_id"])}
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 16
        assert (await schema_check.check_url(scratch_url)).ok
        # the rows written before read as they did, untouched
        after = await _api(pool, workspace)
        assert {k: {**v, "type": "click"} for k, v in before.items()} == after
        assert await conn.fetchval("SELECT count(*) FROM events WHERE device_id IS NOT NULL") == 0

        # the same clicks written now: a narrow row, read the same
        new = [_new_click(workspace, f"vn{i}", c) for i, c in enumerate(CLICKS)]
        late_of_person = _new_click(workspace, "vp", CLICKS[1])
        done = await write_batch(pool, [*new, late_of_person], enricher)
        assert done.inserted == len(new) + 1
        answers = await _api(pool, workspace)
        for was, now in zip(old, new, strict=True):
            a, b = answers[str(was)], answers[str(now.event_id)]
            assert {k: a[k] for k in _SAME} == {k: b[k] for k in _SAME}
        assert answers[str(new[2].event_id)]["enrichment"]["ip"] == "::102:304"
        rows = await conn.fetch(
            "SELECT enrichment, device_id FROM events WHERE event_id = ANY($1::uuid[])", [e.event_id for e in new]
        )
        assert all(r["device_id"] is not None and "versions" not in (r["enrichment"] or {}) for r in rows)
        # one entry per device: the browser's and the crawler's
        assert await conn.fetchval("SELECT count(*) FROM event_devices") == 2
        # drops read the bot's reason from either form
        reasons = await conn.fetch(
            "SELECT enrichment->>'bot_reason' AS r FROM events WHERE is_bot AND event_id = ANY($1::uuid[])",
            [old[3], new[3].event_id],
        )
        assert [r["r"] for r in reasons] == ["ua_spider", "ua_spider"]

        # an erasure scrubs either form alike; the dictionary is no one's and stays
        lead = {"code": "OLD1", "click_id": clicks.mint(person), "visitor_id": "vp", "external_id": "cus_p"}
        await write_batch(pool, [Envelope(EventType.LEAD, Dialect.REFPORT, lead | {"name": "Sign Up"}, workspace)])
        ids = [str(person), str(late_of_person.event_id)]
        unerased = [answers[i]["enrichment"] for i in ids]
        assert all(doc["as_name"] and doc["ip"] for doc in unerased)
        await pg_erasure.erase(pool, workspace, "cus_p", by="test", archive_days=30)
        erased = await _api(pool, workspace)
        for i, doc in zip(ids, unerased, strict=True):
            assert erased[i]["enrichment"] == doc | dict.fromkeys(ledger.ENRICHMENT_PERSONAL)
            assert erased[i]["ip"] is erased[i]["user_agent"] is erased[i]["asn"] is None
        # a click of the erased visitor that arrives later is stored scrubbed (no User-Agent:
        # a device no batch before named, made in the batch's transaction)
        again = _new_click(workspace, "vp", CLICKS[0])
        assert (await write_batch(pool, [again], enricher)).inserted == 1
        late = (await _api(pool, workspace))[str(again.event_id)]["enrichment"]
        assert (late["device_type"], late["bot_reason"], late["ip"]) == ("other", "ua_missing", None)

        # the rollback: every row its whole document again, read the same by schema 15's query
        # (schema 17's places rolled back first: docs/operations.md takes them in that order)
        from .test_places_migrate import rolled_back

        reads = await _api(pool, workspace)
        await rolled_back(conn)
        last = uuid.UUID(int=0)
        while (last := await conn.fetchval(ROLLBACK, last)) is not None:
            pass
        assert await conn.fetchval("SELECT count(*) FROM events WHERE device_id IS NOT NULL") == 0
        v15 = {str(r["event_id"]): manage.row_json(r) for r in await pool.fetch(_V15_EVENTS, link["workspace_id"])}
        assert {k: v["enrichment"] for k, v in v15.items()} == {k: v["enrichment"] for k, v in reads.items()}
    finally:
        ledger.forget_salt()
        enricher.close()
        await pool.close()
        await conn.close()
