"""`refstream migrate` from schema 16 to 17 on a database holding today's rows: what an
address tells of its network (AS name, city, region, coordinates) moves to `event_places`,
named by the row's `place_id`, and a row's payload leaves out its link's code and its
referrer. Rows written before keep their document and payload and read as they did; rows
written after read the same through `event_enrichment` and `event_payload`; an erasure
scrubs either; and the rollback (docs/operations.md) puts every place back into its rows'
documents and every payload back whole."""

from __future__ import annotations

import uuid

import asyncpg
import orjson

from ingest.contract import clicks
from ingest.contract import erasure as ledger
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, ensure_database, migrate
from ingest.privacy import erasure as pg_erasure
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch

from ._migrate import old_database
from .test_enrichment_migrate import _WORLD, CLICKS, _api, _new_click, _payload

# the row's document as schema 16's worker wrote it (workers/consumer/event_row.py, then)
_V16_ROW_FIELDS = ("as_name", "city", "region", "latitude", "longitude", "bot_reason", "referrer_domain")
_V16_INSERT = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, affiliate_id, click_id, visitor_id,
                    visitor_key, dialect, is_bot, received_at, ip, user_agent, referrer, country, asn,
                    enrichment, payload, device_id)
VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $7, 'affitor', $8, now(), $9::inet, $10, $11, $12, $13, $14::text::jsonb,
        $15::text::jsonb, $16)
"""
_V16_DEVICE = """
WITH made AS (INSERT INTO event_devices (doc) VALUES ($1::text::jsonb) ON CONFLICT (doc) DO NOTHING RETURNING id)
SELECT id FROM made UNION ALL SELECT id FROM event_devices WHERE doc = $1::text::jsonb
"""
# GET /v1/events' enrichment and payload as schema 16 read them
_V16_EVENTS = (
    "SELECT event_id, event_enrichment(enrichment, device_id, ip, country, asn, is_bot) AS enrichment, payload"
    " FROM events WHERE workspace_id = $1"
)
# docs/operations.md, "Migrating to schema 17", rolling back the places: one page of it
ROLLBACK = """
WITH page AS (
    SELECT event_id FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000
), done AS (
    UPDATE events e SET enrichment = coalesce(e.enrichment, '{}') || p.doc, place_id = NULL
    FROM page, event_places p WHERE e.event_id = page.event_id AND p.id = e.place_id
)
SELECT event_id FROM page ORDER BY event_id DESC LIMIT 1
"""


# the same, for the payloads
ROLLBACK_PAYLOADS = """
WITH page AS (
    SELECT event_id FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000
), done AS (
    UPDATE events e SET payload = event_payload(e.payload, e.link_id, e.referrer)
    FROM page WHERE e.event_id = page.event_id AND NOT e.payload ? 'code'
)
SELECT event_id FROM page ORDER BY event_id DESC LIMIT 1
"""


async def rolled_back(conn: asyncpg.Connection) -> None:
    """The rollback's statements, page by page, to the end: schema 26's first (its rows'
    referrer domains back), schema 20's (its rows' User-Agents and clicks' ids back), then
    this one's."""
    from ._migrate import rollback_26
    from .test_agents_migrate import ROLLBACK as ROLLBACK_20

    await rollback_26(conn)
    for statement in (ROLLBACK_20, ROLLBACK, ROLLBACK_PAYLOADS):
        last = uuid.UUID(int=0)
        while (last := await conn.fetchval(statement, last)) is not None:
            pass


async def _v16_click(
    conn: asyncpg.Connection, enricher: Enricher, link: asyncpg.Record, visitor: str, click: tuple[str, str, str | None]
) -> uuid.UUID:
    ip, ua, referrer = click
    found = enricher.enrich_row(ip, ua, referrer)
    row = {k: v for k in _V16_ROW_FIELDS if (v := found.doc[k]) is not None}
    if found.doc["ip"] and ":" in found.doc["ip"]:
        row["ip"] = found.doc["ip"]
    device = await conn.fetchval(_V16_DEVICE, orjson.dumps(enricher.device_doc(found.device)).decode())
    eid = uuid7()
    await conn.execute(
        _V16_INSERT,
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
        orjson.dumps(row or None).decode(),
        orjson.dumps(_payload("OLD1", clicks.mint(eid), visitor, referrer)).decode(),
        device,
    )
    return eid


_SAME = ("ip", "user_agent", "referrer", "country", "asn", "is_bot", "enrichment")


async def test_a_schema_16_database_with_rows_takes_the_places_of_schema_17(
    scratch_url: str, settings: Settings
) -> None:
    await ensure_database(scratch_url)
    ledger.forget_salt()
    conn = await asyncpg.connect(scratch_url)
    pool = await create_pg_pool(settings.model_copy(update={"database_url": scratch_url}), min_size=1, max_size=2)
    enricher = Enricher()
    try:
        await old_database(conn, 16)
        link = await conn.fetchrow(_WORLD)
        workspace = str(link["workspace_id"])
        old = [await _v16_click(conn, enricher, link, f"vo{i}", c) for i, c in enumerate(CLICKS)]
        person = await _v16_click(conn, enricher, link, "vp", CLICKS[0])
        v16_rows = await pool.fetch(_V16_EVENTS, link["workspace_id"])
        before = {str(r["event_id"]): r["enrichment"] for r in v16_rows}
        payloads = {str(r["event_id"]): r["payload"] for r in v16_rows}
        assert before[str(old[0])]["as_name"]  # the test can fail: the address told a network
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 17
        assert (await schema_check.check_url(scratch_url)).ok
        after = await _api(pool, workspace)
        assert before == {k: v["enrichment"] for k, v in after.items()}  # read as they were, untouched
        assert payloads == {k: v["payload"] for k, v in after.items()}
        assert await conn.fetchval("SELECT count(*) FROM events WHERE place_id IS NOT NULL") == 0

        # the same clicks written now: each network once, named by the row; read the same
        new = [_new_click(workspace, f"vn{i}", c) for i, c in enumerate(CLICKS)]
        late_of_person = _new_click(workspace, "vp", CLICKS[1])
        assert (await write_batch(pool, [*new, late_of_person], enricher)).inserted == len(new) + 1
        answers = await _api(pool, workspace)
        for was, now in zip(old, new, strict=True):
            a, b = answers[str(was)], answers[str(now.event_id)]
            assert {k: a[k] for k in _SAME} == {k: b[k] for k in _SAME}
            assert b["payload"] == now.payload  # as the client sent it, code and referrer read back
        stored = await conn.fetch(
            "SELECT payload::text FROM events WHERE event_id = ANY($1::uuid[])", [e.event_id for e in new]
        )
        assert not any({"code", "referrer"} & set(orjson.loads(r[0])) for r in stored)
        for e, (ip, _, _) in zip(new, CLICKS, strict=True):
            row = await conn.fetchrow("SELECT enrichment, place_id FROM events WHERE event_id = $1", e.event_id)
            if (place := enricher.place_doc(enricher.place_of(ip))) is None:
                assert row["place_id"] is None  # a private or unknown address names no place
            else:
                assert row["place_id"] is not None
                assert not set(place) & set(orjson.loads(row["enrichment"] or "{}"))
        places = {enricher.place_of(ip) for ip, _, _ in CLICKS} - {enricher.place_of(None)}
        assert await conn.fetchval("SELECT count(*) FROM event_places") == len(places) > 0

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
            assert answers[i]["payload"]["referrer"] and "referrer" not in erased[i]["payload"]
            assert erased[i]["payload"]["code"] == "OLD1"
        assert await conn.fetchval("SELECT count(*) FROM event_places") == len(places)

        # the rollback: every place back in its rows' documents, read the same by schema 16's read
        reads = await _api(pool, workspace)
        await rolled_back(conn)
        assert await conn.fetchval("SELECT count(*) FROM events WHERE place_id IS NOT NULL") == 0
        v16_rows = await pool.fetch(_V16_EVENTS, link["workspace_id"])
        assert {str(r["event_id"]): r["enrichment"] for r in v16_rows} == {k: v["enrichment"] for k, v in reads.items()}
        assert {str(r["event_id"]): r["payload"] for r in v16_rows} == {k: v["payload"] for k, v in reads.items()}
    finally:
        ledger.forget_salt()
        enricher.close()
        await pool.close()
        await conn.close()
