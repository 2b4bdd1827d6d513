"""`refstream migrate` from schema 16 to 17 on a database holding today's rows: a fraud
flag holds what its event's row does not. Flags written before keep their link, type, time
and the click's address in the evidence, and are read through their events like the new
narrow ones: the drops' recount and an affiliate's erasure find both forms. The rollback
(docs/operations.md) gives every flag its columns and its index back, and schema 16's
recount then reads the same."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure as ledger
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import SCHEMA_VERSION, ensure_database, migrate
from ingest.privacy import erasure_affiliate
from workers.consumer import burst_pass, drops
from workers.consumer.store import write_batch

from ._migrate import ROLLBACK_25, old_database
from ._world import BROWSER
from .test_windows_migrate import ROLLBACK as ROLLBACK_18

_WORLD = """
WITH w AS (INSERT INTO workspaces (name) VALUES ('old') RETURNING id),
p AS (INSERT INTO programs (workspace_id, name, fraud_thresholds)
      SELECT id, 'Main', '{"burst_clicks": 2}' FROM w RETURNING id, workspace_id),
a AS (INSERT INTO affiliates (workspace_id, program_id, external_id)
      SELECT workspace_id, id, 'u1' FROM p RETURNING id, workspace_id, program_id)
INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)
SELECT workspace_id, program_id, id, 'OLD1', 'https://example.com/' FROM a
RETURNING id, workspace_id, program_id, affiliate_id
"""
OLD_IP = "198.51.100.7"  # the bursting address of the clicks stored before: the affiliate's own
NEW_IP = "198.51.100.8"
# what schema 16's worker wrote of a click, and of its click_burst flag (workers/consumer/fraud.py, then)
_V16_CLICK = """
INSERT INTO events (event_id, type, workspace_id, link_id, program_id, affiliate_id, visitor_key, dialect,
                    received_at, ip, user_agent, payload)
VALUES ($1, 1, $2, $3, $4, $5, 'h:x', 'biore', $6, $7::inet, $8, '{"code": "OLD1"}')
"""
_V16_FLAG = """
INSERT INTO event_flags (event_id, rule, workspace_id, link_id, affiliate_id, type, excluded, evidence, received_at)
VALUES ($1, 'click_burst', $2, $3, $4, 1, false, $5::text::jsonb, $6)
"""
_V16_DROPS = """
INSERT INTO drop_stats (workspace_id, link_id, day, reason, detail, source, n)
VALUES ($1, $2, $3, 'flagged', 'click_burst', 'worker', $4)
"""
# docs/operations.md, "Migrating to schema 17", rolling back
ROLLBACK = """
UPDATE event_flags f
SET link_id = e.link_id, affiliate_id = e.affiliate_id, type = e.type, received_at = e.received_at,
    evidence = CASE WHEN f.rule = 'click_burst' AND e.ip IS NOT NULL AND NOT f.evidence ? 'ip'
                    THEN f.evidence || jsonb_build_object('ip', host(e.ip)) ELSE f.evidence END
FROM events e
WHERE e.event_id = f.event_id AND f.link_id IS NULL;
CREATE INDEX IF NOT EXISTS event_flags_link ON event_flags (link_id, received_at);
"""
# schema 16's recount of the flags (workers/consumer/drops.py, then): by the flag's own columns
_V16_RECOUNT = """
SELECT rule, count(*) AS n FROM event_flags
WHERE link_id = ANY($1::uuid[]) AND received_at >= $2 AND received_at < $3 AND event_id >= $4
GROUP BY 1
"""
_NIL = uuid.UUID(int=0)


async def _recount(conn: asyncpg.Connection, link: Any, start: datetime) -> tuple[list[dict[str, Any]], int]:
    """The drops' drift for the link over the day, and the flags its recount found."""
    end = start + timedelta(days=1)
    async with conn.transaction():
        drift = await drops.drift(conn, [link["id"]], (start, end), (start.date(), end.date()), _NIL, fix=False)
        n = await conn.fetchval("SELECT sum(n) FROM reconcile_drops WHERE reason = 'flagged'")
    return drift, int(n or 0)


async def test_a_schema_16_database_with_flags_takes_schema_17(scratch_url: str, settings: Settings) -> None:
    await ensure_database(scratch_url)
    ledger.forget_salt()
    conn = await asyncpg.connect(scratch_url)
    pool = await create_pg_pool(settings.model_copy(update={"database_url": scratch_url}), min_size=1, max_size=2)
    try:
        await old_database(conn, 16)
        link = await conn.fetchrow(_WORLD)
        ws, aff = link["workspace_id"], link["affiliate_id"]
        await conn.execute("INSERT INTO affiliate_ips (affiliate_id, ip) VALUES ($1, $2::inet)", aff, OLD_IP)
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        # four clicks from one address stored by schema 16's worker: the last two flagged
        for i in range(4):
            eid, at = uuid7(), now + timedelta(milliseconds=i)
            await conn.execute(_V16_CLICK, eid, ws, link["id"], link["program_id"], aff, at, OLD_IP, BROWSER)
            if i >= 2:
                evidence = {"ip": OLD_IP, "clicks": 3, "threshold_clicks": 2, "window_seconds": 60}
                await conn.execute(_V16_FLAG, eid, ws, link["id"], aff, orjson.dumps(evidence).decode(), at)
        await conn.execute(_V16_DROPS, ws, link["id"], day.date(), 2)
        assert not (await schema_check.check_url(scratch_url)).ok

        assert await migrate(conn) == SCHEMA_VERSION >= 17
        assert (await schema_check.check_url(scratch_url)).ok
        assert await conn.fetchval("SELECT to_regclass('event_flags_link')") is None
        # the flags written before are recounted through their events, as they were counted
        assert await _recount(conn, link, day) == ([], 2)

        # four clicks from another address, stored now: two narrow flags, the address on the row only
        clicks = [
            Envelope(
                EventType.CLICK,
                Dialect.BIORE,
                {"code": "OLD1"},
                workspace_id=str(ws),
                ip=NEW_IP,
                user_agent=BROWSER,
                received_at_ms=int(now.timestamp() * 1000) + 10,
            )
            for _ in range(4)
        ]
        assert (await write_batch(pool, clicks)).inserted == 4
        assert (await burst_pass.run(pool)).flagged == 2  # judged after the commit (schema 23)
        # this build's flags are burst_flags rows (schema 25) without the address, the row's own
        new = [
            orjson.loads(r[0])
            for r in await conn.fetch(
                "SELECT f.evidence::text FROM click_burst_flags f JOIN events e USING (event_id) WHERE host(e.ip) = $1",
                NEW_IP,
            )
        ]
        assert [(doc["threshold_clicks"], doc["window_seconds"]) for doc in new] == [(2, 60)] * 2
        assert not any("ip" in doc for doc in new)
        assert await _recount(conn, link, day) == ([], 4)

        # an affiliate's erasure finds the flags of their events: the old form's copy of
        # their address is redacted
        await erasure_affiliate.erase(pool, str(ws), affiliate_id=str(aff), by="test", archive_days=30)
        left = [orjson.loads(r[0]) for r in await conn.fetch("SELECT evidence::text FROM click_burst_flags")]
        assert len(left) == 4 and not any(OLD_IP in orjson.dumps(doc).decode() for doc in left)
        assert sum(1 for doc in left if "ip" in doc and doc["ip"] is None) == 2

        # the rollback: schema 18's first (flags on the rows, of schemas 18 to 22, become rows of their own),
        # then every flag its columns and its index back, read the same by schema 16's recount
        await conn.execute(ROLLBACK_25)
        await conn.execute(ROLLBACK_18)
        await conn.execute(ROLLBACK)
        assert await conn.fetchval("SELECT count(*) FROM event_flags WHERE link_id IS NULL") == 0
        assert await conn.fetchval("SELECT to_regclass('event_flags_link')") is not None
        old = await conn.fetch(_V16_RECOUNT, [link["id"]], day, day + timedelta(days=1), _NIL)
        assert [(r["rule"], r["n"]) for r in old] == [("click_burst", 4)]
        restored = await conn.fetch(
            "SELECT evidence->>'ip' AS ip FROM event_flags f JOIN events e USING (event_id) WHERE host(e.ip) = $1",
            NEW_IP,
        )
        assert [r["ip"] for r in restored] == [NEW_IP, NEW_IP]
    finally:
        ledger.forget_salt()  # the erasure read this scratch database's salt: no later test's
        await pool.close()
        await conn.close()
