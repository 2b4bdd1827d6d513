"""An erasure in Postgres: the ledger first, then every stored row of the person scrubbed.

Three steps (``erase``), each a transaction:

1. The ledger. Who the person is, read by indexed columns only: their customers rows, their
   leads and their sales give their visitor ids, the click ids their leads named (and the
   row that holds a named click's key, where it is a copy: ``ingest.contract.copies``), and
   the time of their first event. The erasure's row and one ``erased_ids`` digest per
   identifier go in (``ingest.contract.erasure``); an erasure of someone erased before
   adds what is new and keeps its row.
2. The fence. The ledger's advisory lock, taken exclusive and let go: every batch that read
   the ledger before step 1 committed holds it shared until it commits, so once this
   returns, each of their rows is in, and every later batch scrubs by itself.
3. The rows: events (of those visitors, those clicks, that external id), their dedupe
   keys, unique-visitor keys and fraud evidence, customers, their leads (``customer_leads``),
   sales, commissions, webhook payloads, and the affiliates' per-IP rows holding one of the person's addresses. Each
   value becomes what the workers would have stored for the scrubbed event, so a replay of
   any copy changes nothing, and no counter moves: reconcile agrees before and after
   (``scrub_rows``, ``ingest.privacy.erasure_rows``).

What lies outside Postgres (Redis, the archive) is the workers' to finish
(``workers.ops.erasure``); ``erasures`` records what each place still holds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks as erasure_clicks
from ingest.contract import clock, erasure
from ingest.contract.connections import Command
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.privacy.erasure_rows import _EVENTS as _EVENTS
from ingest.privacy.erasure_rows import scrub_rows as scrub_rows
from ingest.privacy.erasure_rows import uuid_floor as uuid_floor

_PASSES = 5  # a person whose visitors keep turning up more: each pass fences and scans again

_IDENTIFY = """
WITH c AS (SELECT visitor_id, first_click_id, first_seen_at FROM customers
           WHERE workspace_id = $1 AND external_id = $2),
     l AS (SELECT visitor_id, click_id, received_at FROM events
           WHERE workspace_id = $1 AND type = 2 AND customer_external_id = $2),
     s AS (SELECT received_at FROM sales WHERE workspace_id = $1 AND customer_external_id = $2),
     n AS (SELECT first_click_id AS click_id FROM c WHERE first_click_id IS NOT NULL
           UNION SELECT click_id FROM l WHERE click_id IS NOT NULL),
     -- the row that holds a named click's key, where the click is a copy (ingest.contract.copies)
     k AS (SELECT event_id FROM event_dedupe WHERE workspace_id = $1 AND type = 1
           AND dedupe_key = ANY(array(SELECT 'copy:' || replace(click_id::text, '-', '') FROM n)))
SELECT array(SELECT visitor_id FROM c UNION SELECT visitor_id FROM l WHERE visitor_id IS NOT NULL) AS visitors,
       array(SELECT click_id FROM n UNION SELECT event_id FROM k) AS clicks,
       least((SELECT min(first_seen_at) FROM c), (SELECT min(received_at) FROM l),
             (SELECT min(received_at) FROM s)) AS since
"""
_LEDGER = """
INSERT INTO erasures (id, workspace_id, subject, requested_by, since, archive_due)
VALUES ($1, $2, $3, $4, $5, now() + make_interval(days => $6))
ON CONFLICT (workspace_id, subject) DO UPDATE
    SET since = least(erasures.since, EXCLUDED.since), postgres_at = NULL, redis_at = NULL, archive_at = NULL,
        archive_due = least(erasures.archive_due, EXCLUDED.archive_due), generation = erasures.generation + 1
RETURNING id, (xmax = 0) AS created, requested_at, archive_due, generation
"""
# the person's identifiers, in their workspace's ledger: another workspace's visitor of the
# same id is another person (docs/privacy.md)
_IDS = """
INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id)
SELECT d, $1, k, $4 FROM unnest($2::bytea[], $3::text[]) AS x(d, k)
ON CONFLICT (digest, workspace_id) DO NOTHING
"""


@dataclass(slots=True)
class Erased:
    """What ``erase`` did: the erasure's id, and the count of rows each table changed."""

    id: uuid.UUID
    created: bool
    requested_at: datetime
    archive_due: datetime
    rows: dict[str, int] = field(default_factory=dict)
    # in memory only, never stored or logged: what the caller deletes from Redis at once
    # (the click cache's entries, the rate limiter's keys named by an address)
    clicks: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    customers: list[tuple[str, str]] = field(default_factory=list)  # (workspace, external id): deferred leads

    def to_dict(self) -> dict[str, Any]:
        return {
            "erasure_id": str(self.id),
            "status": "pending",
            "requested_at": self.requested_at.isoformat(),
            "archive_due": self.archive_due.isoformat(),
            "postgres": self.rows,
            "pending": ["redis", "archive"],
        }


async def erase(pool: asyncpg.Pool, workspace_id: str, external_id: str, *, by: str, archive_days: int) -> Erased:
    """Erase the customer ``external_id`` of ``workspace_id`` from Postgres, and record
    what Redis and the archive still hold (the module's doc)."""
    async with pool.acquire() as conn:
        async with conn.transaction():  # 1. the ledger
            key = await erasure.salt(conn)
            who = await conn.fetchrow(_IDENTIFY, workspace_id, external_id)
            visitors = [v for v in who["visitors"] if not erasure.is_pseudonym(v)]
            clicks = list(who["clicks"])
            since = _first(who["since"], clicks)
            # a visitor id or a click another customer's events name too (one browser, two
            # sign-ups) is not the person's alone: it stays out of their ledger, and their
            # erasure takes from it only what is theirs (docs/privacy.md, *A browser two
            # customers share*)
            shared_visitors, shared_clicks = await erasure.held_by_others(
                conn, key, workspace_id, external_id, visitors, clicks
            )
            visitors = [v for v in visitors if v not in shared_visitors]
            clicks = [c for c in clicks if c not in shared_clicks]
            made = await conn.fetchrow(
                _LEDGER,
                uuid.uuid4(),
                workspace_id,
                erasure.digest(key, EXTERNAL, external_id, workspace_id),
                by,
                since,
                archive_days,
            )
            ids = [(erasure.digest(key, EXTERNAL, external_id, workspace_id), EXTERNAL)]
            ids += [(erasure.digest(key, VISITOR, v), VISITOR) for v in visitors]
            ids += [(erasure.digest(key, EVENT, c.hex), EVENT) for c in clicks]
            await conn.execute(_IDS, made["id"], [d for d, _ in ids], [k for _, k in ids], workspace_id)
        out = Erased(made["id"], made["created"], made["requested_at"], made["archive_due"])
        out.customers = [(workspace_id, external_id)]
        for _ in range(_PASSES):
            async with conn.transaction():  # 2. the fence
                await conn.execute("SELECT pg_advisory_xact_lock($1)", erasure.LOCK)
            async with conn.transaction():  # 3. the rows
                rows, more_visitors, more_clicks, ips = await scrub_rows(
                    conn,
                    key,
                    workspace_id,
                    external_id,
                    visitors,
                    clicks,
                    since,
                    shared_visitors=sorted(shared_visitors),
                )
                out.ips = sorted(set(out.ips) | set(ips))
                # what the scan found beyond step 1's indexes (a click of one of the visitors)
                # goes into the ledger too, and is fenced and scanned for again
                more = [(erasure.digest(key, VISITOR, v), VISITOR) for v in more_visitors]
                more += [(erasure.digest(key, EVENT, c.hex), EVENT) for c in more_clicks]
                if more:
                    await conn.execute(_IDS, made["id"], [d for d, _ in more], [k for _, k in more], workspace_id)
                out.rows = {k: max(v, out.rows.get(k, 0)) for k, v in rows.items()}
                if not more:
                    # its own generation re-checked: these passes, behind their fences, found
                    # every row the ledger names (the sweep's re-check is for what a writer
                    # teaches the ledger later, which moves the generation on)
                    await conn.execute(
                        "UPDATE erasures SET postgres_at = now(), done = done || $2::text::jsonb, rechecked = $3"
                        " WHERE id = $1",
                        made["id"],
                        orjson.dumps({"postgres": out.rows}).decode(),
                        made["generation"],
                    )
                    break
            visitors += more_visitors
            clicks += more_clicks
    out.clicks = [erasure_clicks.mint(c) for c in clicks]
    return out


def _first(since: datetime | None, clicks: list[uuid.UUID]) -> datetime | None:
    """The person's first event: their rows' earliest, or a click their leads named, if
    earlier (the click was stored, or is still on its way; the archive pass starts there)."""
    ms = erasure.first_ms(int(since.timestamp() * 1000) if since is not None else None, clicks)
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


ROW = """
SELECT id, workspace_id, requested_at, requested_by, since, archive_due, postgres_at, redis_at, archive_at, done,
       generation, rechecked
FROM erasures
"""


def describe(r: asyncpg.Record) -> dict[str, Any]:
    """An erasure as the API and ``refstream erase --status`` show it: no personal data."""
    places = (("postgres", r["postgres_at"]), ("redis", r["redis_at"]), ("archive", r["archive_at"]))
    pending = [p for p, at in places if at is None]
    done = r["done"] if isinstance(r["done"], dict) else orjson.loads(r["done"] or "{}")
    return {
        "erasure_id": str(r["id"]),
        "workspace_id": str(r["workspace_id"]),
        "status": "pending" if pending else "done",
        "pending": pending,
        "requested_at": r["requested_at"].isoformat(),
        "requested_by": r["requested_by"],
        "archive_due": r["archive_due"].isoformat(),
        "overdue": bool(pending) and r["archive_due"] < clock.utcnow(),
        **{f"{p}_at": at.isoformat() if at else None for p, at in places},
        "done": done,
    }


async def show(conn: asyncpg.Connection, workspace_id: str, erasure_id: str) -> dict[str, Any]:
    try:
        wanted = uuid.UUID(erasure_id)
    except ValueError:
        raise NotFound("erasure not found") from None
    r = await conn.fetchrow(ROW + " WHERE id = $1 AND workspace_id = $2", wanted, workspace_id)
    if r is None:
        raise NotFound("erasure not found")
    return describe(r)


def redis_deletes(keys: Keys, out: Erased) -> list[Command]:
    """What Redis deletes at once: the click cache's entries of the person's clicks, the
    rate limiter's windows named by one of their addresses (they would go within a window),
    and a deferred lead's click waiting for the customer (``ingest.edge.lead``)."""
    dels: list[Command] = [("DEL", keys.click(c)) for c in out.clicks]
    dels += [("DEL", keys.ratelimit(limiter, ip)) for ip in out.ips for limiter in keys.LIMITERS]
    dels += [("DEL", keys.deferred(workspace, customer)) for workspace, customer in out.customers]
    return dels
