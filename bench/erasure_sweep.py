"""The erasure sweep's cost while erasures are pending: ``python -m bench.erasure_sweep``.

Not a part of ``python -m bench`` (it needs no edge, no workers and no traffic: one
database and the sweep's own code), and not a test. It makes a database of its own on the
Postgres at ``--postgres`` (dropped at the end), migrated by the checkout's schema.sql, with
``--events`` event rows (default 1,000,000) over the last 30 days in ``--workspaces``
workspaces (default 50), every row holding personal data (an IP, a referrer, a visitor id),
and ``--erasures`` pending erasures (default 100) in ``--erasing`` of the workspaces
(default 10): each with its ledger entries (a customer and a visitor nobody has any more:
their rows were scrubbed by the erasure, so the sweep finds nothing to scrub and what it
costs is its look). Then it times, on an empty Redis prefix (no stream entries: the cost
is Postgres's):

- ``sweep 1``: the first sweep after the erasures (``workers.ops.erasure.sweep``);
- ``sweep 2..n``: the next ones (``--sweeps``, default 3), as the workers run them every
  ``REFSTREAM_ERASE_SWEEP_EVERY_S`` while the erasures stay pending (an archive not yet
  rewritten, an entry not yet read);
- ``erase``: one ``DELETE /v1/customers/{id}`` in Postgres (``ingest.privacy.erasure.erase``)
  of a customer with a lead, in a workspace of ``events / workspaces`` rows.

It runs against whichever code the checkout holds, so the figures before and after a
change come from the same script (``git stash`` or a checkout of the older commit's
``ingest/ workers/ schema.sql``). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from ingest.contract import erasure as ledger
from ingest.contract import wire
from ingest.contract.events import Envelope, EventType
from ingest.contract.keys import Keys
from ingest.manage.db import migrate
from ingest.privacy import erasure as pg_erasure
from workers.consumer.partitions import maintain
from workers.ops import erasure

DAYS = 30

_WORKSPACES = """
INSERT INTO workspaces (id, name)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(w), 12, '0'))::uuid, 'ws' || w FROM generate_series(1, $1) w
"""
_PROGRAMS = """
INSERT INTO programs (id, workspace_id, name)
SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(w), 12, '0'))::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(w), 12, '0'))::uuid, 'p' FROM generate_series(1, $1) w
"""
_LINKS = """
INSERT INTO links (id, workspace_id, program_id, code, url)
SELECT ('00000000-0000-4000-b000-' || lpad(to_hex(w), 12, '0'))::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(w), 12, '0'))::uuid,
       ('00000000-0000-4000-9000-' || lpad(to_hex(w), 12, '0'))::uuid, 'L' || w, 'https://example.com/'
FROM generate_series(1, $1) w
"""
# events $4 to $5 - 1: from $1 (ms) on, $2 ms apart, round the workspaces ($3); one in ten a lead
_EVENTS = """
INSERT INTO events (event_id, type, workspace_id, link_id, dialect, received_at, visitor_id, ip, referrer,
                    customer_external_id, payload)
SELECT (lpad(to_hex($1::bigint + i * $2::bigint), 12, '0') || '7' || substr(md5(i::text), 1, 3) || '8'
        || substr(md5(i::text), 4, 15))::uuid,
       CASE WHEN i % 10 = 0 THEN 2 ELSE 1 END::smallint,
       ('00000000-0000-4000-8000-' || lpad(to_hex(i % $3 + 1), 12, '0'))::uuid,
       ('00000000-0000-4000-b000-' || lpad(to_hex(i % $3 + 1), 12, '0'))::uuid, 'native',
       to_timestamp(($1::bigint + i * $2::bigint) / 1000.0), 'v' || i,
       ('10.' || (i % 250) || '.' || ((i / 250) % 250) || '.1')::inet, 'https://blog.example/' || (i % 1000),
       CASE WHEN i % 10 = 0 THEN 'c' || i END, '{}'::jsonb
FROM generate_series($4::bigint, $5::bigint - 1) i
"""
_CHUNK = 100_000
_ID_SCOPED = "INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id) VALUES ($1, $2, $3, $4)"
_ID_GLOBAL = "INSERT INTO erased_ids (digest, erasure_id, kind) VALUES ($1, $2, $3)"


def _ws(w: int) -> str:
    return f"00000000-0000-4000-8000-{w:012x}"


async def _fill(conn: asyncpg.Connection, events: int, workspaces: int, erasures: int, erasing: int) -> tuple[str, str]:
    """The rows (the module's doc); a customer to erase: their workspace and external id."""
    for back in range(DAYS, -1, -5):  # each run makes the days around its "today": all 30 days partitioned
        await maintain(conn, retention_days=DAYS + 5, dedupe_days=DAYS + 5, today=date.today() - timedelta(days=back))
    for sql in (_WORKSPACES, _PROGRAMS, _LINKS):
        await conn.execute(sql, workspaces)
    start_ms = int((datetime.now(UTC) - timedelta(days=DAYS - 1)).timestamp() * 1000)
    step_ms = (DAYS - 2) * 86_400_000 // events
    for lo in range(0, events, _CHUNK):
        await conn.execute(_EVENTS, start_ms, step_ms, workspaces, lo, min(lo + _CHUNK, events))
    key = await ledger.salt(conn)
    scoped = await conn.fetchval(  # the ledger per workspace (schema 11), or one for all (before)
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'erased_ids' AND column_name = 'workspace_id'"
    )
    since = datetime.now(UTC) - timedelta(days=DAYS - 2)
    for n in range(erasures):
        ws = _ws(n % erasing + 1)
        gone = f"gone-{n}"
        subject = ledger.digest(key, ledger.EXTERNAL, gone, ws)
        eid = await conn.fetchval(
            "INSERT INTO erasures (id, workspace_id, subject, requested_by, since, archive_due, postgres_at)"
            " VALUES (gen_random_uuid(), $1, $2, 'bench', $3, now() + interval '30 days', now()) RETURNING id",
            ws,
            subject,
            since,
        )
        ids = [(subject, ledger.EXTERNAL), (ledger.digest(key, ledger.VISITOR, f"gone-visitor-{n}"), ledger.VISITOR)]
        for d, kind in ids:
            if scoped:
                await conn.execute(_ID_SCOPED, d, eid, kind, ws)
            else:
                await conn.execute(_ID_GLOBAL, d, eid, kind)
    await conn.execute("ANALYZE")
    assert not await conn.fetchval("SELECT count(*) FROM events_default"), "a day without its partition"
    # a customer with a lead in a workspace with no pending erasure
    found = await conn.fetchrow(
        "SELECT workspace_id::text AS ws, customer_external_id AS x FROM events"
        " WHERE type = 2 AND NOT (workspace_id = ANY($1::uuid[])) ORDER BY event_id LIMIT 1 OFFSET 100",
        [_ws(w) for w in range(1, erasing + 1)],
    )
    return str(found["ws"]), str(found["x"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"refstream_bench_erasure_{os.getpid()}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = args.postgres.rsplit("/", 1)[0]
    redis = aioredis.Redis.from_url(args.redis)
    keys = Keys(f"bench-erasure-{secrets.token_hex(4)}", 4)
    out: dict[str, Any] = {
        "events": args.events,
        "workspaces": args.workspaces,
        "erasures": args.erasures,
        "erasing_workspaces": args.erasing,
    }
    try:
        pool = await asyncpg.create_pool(f"{base}/{name}", min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                t0 = time.perf_counter()
                ws, customer = await _fill(conn, args.events, args.workspaces, args.erasures, args.erasing)
                out["fill_s"] = round(time.perf_counter() - t0, 1)
            ledger.forget_salt()
            # what keeps the erasures pending, sweep after sweep: a stream entry of an erased
            # visitor that the workers' group has yet to read (the sweep leaves it to them)
            await redis.xgroup_create(keys.stream(0), "workers", id="0", mkstream=True)
            entry = Envelope(
                EventType.CLICK, "native", {"code": "L1", "visitor_id": "gone-visitor-0"}, _ws(1), ip="10.0.0.1"
            )
            await redis.xadd(keys.stream(0), wire.to_entry_dict(entry))
            sweeps = []
            for _ in range(args.sweeps):
                t0 = time.perf_counter()
                done = await erasure.sweep(pool, redis, keys, None)
                sweeps.append(
                    {
                        "s": round(time.perf_counter() - t0, 3),
                        "erasures": done.erasures,
                        "rows_rechecked": done.rows_rechecked,
                    }
                )
            out["sweeps"] = sweeps
            t0 = time.perf_counter()
            erased = await pg_erasure.erase(pool, ws, customer, by="bench", archive_days=30)
            out["erase_s"] = round(time.perf_counter() - t0, 3)
            out["erase_rows"] = erased.rows
        finally:
            await pool.close()
    finally:
        await redis.delete(keys.stream(0))
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--workspaces", type=int, default=50)
    p.add_argument("--erasures", type=int, default=100)
    p.add_argument("--erasing", type=int, default=10)
    p.add_argument("--sweeps", type=int, default=3)
    print(orjson.dumps(asyncio.run(run(p.parse_args()))).decode())


if __name__ == "__main__":
    main()
