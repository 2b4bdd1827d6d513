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
   any copy changes nothing, and no counter moves: reconcile agrees before and after.

What lies outside Postgres (Redis, the archive) is the workers' to finish
(``workers.ops.erasure``); ``erasures`` records what each place still holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks as erasure_clicks
from ingest.contract import clock, erasure, jsonrows
from ingest.contract.connections import Command
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.errors import NotFound
from ingest.contract.events import Envelope, EventType
from ingest.contract.fraud import BURST_WINDOW_TABLES
from ingest.contract.keys import Keys
from ingest.privacy import erasure_shared

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
# the person's events, from a month before their first event (their visitors' clicks may
# precede it), or from the first when none is known: each way of naming them an index range
# of its own (events_workspace_customer, _visitor_known, _named_click, the primary key), never a
# scan of the workspace's events. A click whose click id is its own is the primary key's (the
# index by click holds only the rows naming another's: schema 20)
_EVENTS = """
SELECT event_id, type, link_id, received_at, dialect, visitor_id, visitor_key, customer_external_id,
       dedupe_key, enrichment, payload, host(ip) AS ip, event_user_agent(user_agent, agent_id) AS user_agent,
       referrer, click_id
FROM events
WHERE workspace_id = $1 AND event_id >= $5 AND event_id = ANY(ARRAY(
    SELECT event_id FROM events WHERE workspace_id = $1 AND customer_external_id = $2 AND event_id >= $5
    UNION SELECT event_id FROM events WHERE workspace_id = $1 AND visitor_id = ANY($3::text[]) AND event_id >= $5
    UNION SELECT event_id FROM events WHERE event_id = ANY($4::uuid[]) AND workspace_id = $1 AND event_id >= $5
    UNION SELECT event_id FROM events
          WHERE workspace_id = $1 AND click_id = ANY($4::uuid[]) AND click_id <> event_id AND event_id >= $5
))
"""
_SHARED_KEYS = """
SELECT DISTINCT link_id, (received_at AT TIME ZONE 'UTC')::date AS day, visitor_key FROM events
WHERE link_id = ANY($1::uuid[]) AND visitor_key = ANY($2::text[]) AND NOT (event_id = ANY($3::uuid[]))
"""
_EVENT_COLUMNS = (
    ("event_id", "uuid"),
    ("visitor_id", "text"),
    ("visitor_key", "text"),
    ("customer_external_id", "text"),
    ("dedupe_key", "text"),
    ("enrichment", "jsonb"),
    ("payload", "jsonb"),
)
_UPDATE_EVENTS = f"""
UPDATE events e SET visitor_id = x.visitor_id, visitor_key = x.visitor_key,
    customer_external_id = x.customer_external_id, dedupe_key = x.dedupe_key, enrichment = x.enrichment,
    payload = x.payload, ip = NULL, user_agent = NULL, agent_id = NULL, referrer = NULL, asn = NULL, place_id = NULL
FROM {jsonrows.table([t for _, t in _EVENT_COLUMNS], "x(" + ", ".join(n for n, _ in _EVENT_COLUMNS) + ")")}
WHERE e.event_id = x.event_id
"""
_RENAME_VISITS = f"""
WITH x AS (SELECT * FROM {jsonrows.table(("uuid", "date", "text", "text"), "x(c1, c2, c3, c4)")}),
gone AS (
    DELETE FROM link_visitor_days v USING x WHERE v.link_id = x.c1 AND v.day = x.c2 AND v.visitor_key = x.c3
    RETURNING v.link_id, v.day, x.c4 AS visitor_key
)
INSERT INTO link_visitor_days (link_id, day, visitor_key) SELECT * FROM gone ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING
"""
# a raw key renamed to its pseudonym; where the pseudonym's key is held already (a scrubbed
# copy of the lead claimed it before the rename: the generative run's seed 1919904978), the
# raw key goes and the held one stands, so that one key per customer and name remains
_DEDUPE_ROWS = jsonrows.table(("uuid", "smallint", "text", "text"), "x(c1, c2, c3, c4)")
_RENAME_DEDUPE = f"""
WITH held AS (
    DELETE FROM event_dedupe d USING {_DEDUPE_ROWS}
    WHERE d.workspace_id = x.c1 AND d.type = x.c2 AND d.dedupe_key = x.c3
      AND EXISTS (SELECT 1 FROM event_dedupe t WHERE t.workspace_id = x.c1 AND t.type = x.c2 AND t.dedupe_key = x.c4)
)
UPDATE event_dedupe d SET dedupe_key = x.c4
FROM {_DEDUPE_ROWS}
WHERE d.workspace_id = x.c1 AND d.type = x.c2 AND d.dedupe_key = x.c3
  AND NOT EXISTS (SELECT 1 FROM event_dedupe t WHERE t.workspace_id = x.c1 AND t.type = x.c2 AND t.dedupe_key = x.c4)
"""
_CUSTOMERS = """
SELECT id, visitor_id, external_id, email, name, avatar_url FROM customers
WHERE workspace_id = $1 AND (external_id = $2 OR visitor_id = ANY($3::text[]))
ORDER BY id
"""
_UPDATE_CUSTOMER = """
UPDATE customers SET external_id = $3, visitor_id = $2,
    email = NULL, name = NULL, avatar_url = NULL
WHERE id = $1
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


async def scrub_rows(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external_id: str | None,
    visitors: list[str],
    clicks: list[uuid.UUID],
    since: datetime | None,
    *,
    shared_visitors: Sequence[str] = (),
) -> tuple[dict[str, int], list[str], list[uuid.UUID], list[str]]:
    """Scrub the rows of the person ``external_id`` (None: a visitor's or a click's alone),
    their ``visitors`` and ``clicks`` (theirs alone: ``shared_visitors`` gives those another customer
    holds too, found by ``held_by_others``), by identity: an event that names another customer is
    that customer's and is left, and of a customers row of a shared visitor only the
    fields the person's events gave it go (``_unshare``). The rows changed per table, the
    visitors and clicks found that are the person's too, and their addresses."""
    floor = uuid_floor(since - timedelta(days=31)) if since is not None else uuid.UUID(int=0)
    x_alias = erasure.pseudonym(key, EXTERNAL, external_id, workspace_id) if external_id is not None else None
    found = await _theirs(conn, key, workspace_id, (external_id, x_alias), visitors, clicks, floor)
    # the click_burst rule's windows of the person's clicks (workers/consumer/bursts.py),
    # keyed by their address: gone, so a later count of the pair starts afresh. First of
    # the rows it writes: a batch locks a window before the other tables it shares with this
    pairs = sorted({(r["link_id"], r["ip"]) for r in found if r["ip"] and r["type"] == 1 and r["link_id"]})
    windows = {
        table: _count(
            await conn.execute(
                f"DELETE FROM {table} w USING unnest($1::uuid[], $2::inet[]) AS x (link_id, ip)"
                " WHERE w.link_id = x.link_id AND w.ip = x.ip",
                [p[0] for p in pairs],
                [p[1] for p in pairs],
            )
        )
        for table in BURST_WINDOW_TABLES
    }
    ids = [r["event_id"] for r in found]
    # a visitor key made of IP and User-Agent that someone else's click shares stays: it is theirs too
    hashed = sorted({k for r in found if (k := r["visitor_key"]) is not None and k.startswith("h:")})
    links = sorted({r["link_id"] for r in found if r["link_id"] is not None})
    shared = {r["visitor_key"] for r in await conn.fetch(_SHARED_KEYS, links, hashed, ids)} if hashed else set()
    values: dict[str, str | None] = {external_id: x_alias} if external_id is not None else {}  # -> what it becomes
    more_visitors: set[str] = set()
    more_clicks: set[uuid.UUID] = set()
    changed, visits, dedupes = [], set(), []
    for r in found:
        payload = r["payload"] if isinstance(r["payload"], dict) else orjson.loads(r["payload"] or "{}")
        e = Envelope(EventType(r["type"]), r["dialect"], payload, workspace_id, event_id=r["event_id"])
        scrubbed = erasure.scrub(key, e, workspace_id)
        visitor = r["visitor_id"]
        v_alias = visitor
        if visitor is not None and not erasure.is_pseudonym(visitor):
            v_alias = values[visitor] = erasure.pseudonym(key, VISITOR, visitor)
            if visitor not in visitors and visitor not in shared_visitors:
                more_visitors.add(visitor)
        if r["type"] == EventType.CLICK and r["event_id"] not in clicks:
            more_clicks.add(r["event_id"])
        if (named := r["click_id"]) is not None and named not in clicks:  # a lead of one of their visitors
            more_clicks.add(named)
        for name in (*erasure.PERSONAL, "external_id"):
            if isinstance(v := payload.get(name), str) and v:
                values.setdefault(v, scrubbed.payload.get(name) if name == "external_id" else None)
        for v in (r["ip"], r["user_agent"], r["referrer"]):
            if v:
                values[v] = None
        vkey = r["visitor_key"]
        new_vkey = vkey
        if vkey is not None and vkey == visitor:
            new_vkey = v_alias
        elif vkey is not None and vkey.startswith("h:") and vkey not in shared:
            new_vkey = erasure.pseudonym(key, "h", vkey)
        raw = r["customer_external_id"]  # the erased id, or another carried by this visitor's event
        cust = raw
        if raw is not None and not erasure.is_pseudonym(raw):
            values[raw] = cust = erasure.pseudonym(key, EXTERNAL, raw, workspace_id)
        dedupe = _dedupe(r["dedupe_key"], raw, cust, visitor, v_alias)
        changed.append((r["event_id"], v_alias, new_vkey, cust, dedupe, _enrichment(r["enrichment"]), scrubbed.payload))
        if r["type"] == EventType.CLICK and new_vkey != vkey and r["link_id"] is not None:
            visits.add((r["link_id"], r["received_at"].astimezone(UTC).date(), vkey, new_vkey))
        if dedupe != r["dedupe_key"]:
            dedupes.append((workspace_id, r["type"], r["dedupe_key"], dedupe))
    # what the scan found beyond what it was given is theirs only where no other customer
    # holds it too (a lead of theirs on a browser another signed up from)
    if more_visitors or more_clicks:  # (the customers rows are read after: of those visitors too)
        also_v, also_c = await erasure.held_by_others(
            conn, key, workspace_id, external_id, sorted(more_visitors), sorted(more_clicks)
        )
        more_visitors -= also_v
        more_clicks -= also_c
        shared_visitors = [*shared_visitors, *sorted(also_v)]
    people = await conn.fetch(_CUSTOMERS, workspace_id, external_id, [*visitors, *shared_visitors])
    # each row taken for theirs alone decided again behind its lock: another customer's lead
    # may have been stored from the browser since its visitor was found theirs alone
    people, shared_visitors = await erasure_shared.decided(
        conn, key, workspace_id, external_id, people, shared_visitors
    )
    mine = {c["id"] for c in people if c["visitor_id"] not in shared_visitors}
    for c in people:
        if c["id"] in mine:
            for v in (c["email"], c["name"], c["avatar_url"]):
                if v:
                    values[v] = None
    rows = {"events": len(changed)}
    if changed:
        await conn.execute(_UPDATE_EVENTS, jsonrows.doc(sorted(changed)))
    if visits:
        await conn.execute(_RENAME_VISITS, jsonrows.doc(sorted(visits)))
    rows["link_visitor_days"] = len(visits)
    if dedupes:
        await conn.execute(_RENAME_DEDUPE, jsonrows.doc(sorted(dedupes)))
    rows["event_dedupe"] = len(dedupes)
    theirs = {r["event_id"] for r in found if r["customer_external_id"] in (external_id, x_alias) and external_id}
    for c in people:
        if c["id"] not in mine:  # a browser another customer signed up from too: their fields alone
            await _unshare(conn, key, workspace_id, c["id"], (external_id, x_alias), theirs)
            continue
        v = c["visitor_id"]
        alias = v if erasure.is_pseudonym(v) else erasure.pseudonym(key, VISITOR, v)
        x = c["external_id"]  # the erased id, or the one this visitor's row holds
        x_row = x if x is None or erasure.is_pseudonym(x) else erasure.pseudonym(key, EXTERNAL, x, workspace_id)
        if await _merged(conn, workspace_id, c["id"], alias):
            continue
        await conn.execute(_UPDATE_CUSTOMER, c["id"], alias, x_row)
    rows["customers"] = len(people)
    rows["sales"] = _count(
        await conn.execute(
            "UPDATE sales SET customer_external_id = $3, metadata = NULL "
            "WHERE workspace_id = $1 AND customer_external_id = $2",
            workspace_id,
            external_id,
            x_alias,
        )
    )
    rows["customer_leads"] = _count(
        await conn.execute(
            "UPDATE customer_leads SET customer_external_id = $3 WHERE workspace_id = $1 AND customer_external_id = $2",
            workspace_id,
            external_id,
            x_alias,
        )
    )
    rows["commissions"] = _count(
        await conn.execute(
            "UPDATE commissions SET customer_external_id = $3 WHERE workspace_id = $1 AND customer_external_id = $2",
            workspace_id,
            external_id,
            x_alias,
        )
    )
    rows["event_flags"] = await _redact_flags(conn, ids, values)
    sales = await conn.fetch(
        "SELECT event_id FROM sales WHERE workspace_id = $1 AND customer_external_id = $2", workspace_id, x_alias
    )
    subjects = ids + [r["event_id"] for r in sales]
    # a commission.created delivery's subject is the ledger row, not an event: the person's
    # rows (renamed above) and those their events earned
    earned = await conn.fetch(_COMMISSIONS, workspace_id, x_alias, subjects)
    subjects += [r["id"] for r in earned]
    rows["webhook_deliveries"] = await _redact_deliveries(conn, subjects, values)
    rows.update(windows)
    ips = sorted({r["ip"] for r in found if r["ip"]})
    rows["affiliate_ips"] = _count(
        await conn.execute(
            "DELETE FROM affiliate_ips a USING affiliates f WHERE a.affiliate_id = f.id AND f.workspace_id = $1 "
            "AND a.ip = ANY($2::inet[])",
            workspace_id,
            ips,
        )
    )
    return rows, sorted(more_visitors), sorted(more_clicks), ips


async def _theirs(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external: tuple[str | None, str | None],
    visitors: list[str],
    clicks: list[uuid.UUID],
    floor: uuid.UUID,
) -> list[asyncpg.Record]:
    """The person's event rows (``_EVENTS``), but those that name another customer: a lead
    or sale of a customer who is neither ``external`` (the id, or its pseudonym) nor erased
    in the workspace's ledger is theirs, whatever visitor or click it shares with the person."""
    found = await conn.fetch(_EVENTS, workspace_id, external[0], visitors, clicks, floor)
    named = {
        x
        for r in found
        if (x := r["customer_external_id"]) is not None and x not in external and not erasure.is_pseudonym(x)
    }
    if not named:
        return list(found)
    digests = {erasure.digest(key, EXTERNAL, x, workspace_id): x for x in sorted(named)}
    erased = {digests[bytes(d)] for d in await conn.fetchval(_ERASED, list(digests), workspace_id)}
    return [r for r in found if r["customer_external_id"] not in named - erased]


# a customers row's contact fields (the column, the events' payload key) and the events of
# its visitor that carry a customer, newest first: what the row holds without the person
_CONTACT = (("external_id", "external_id"), ("email", "email"), ("name", "customer_name"), ("avatar_url", "avatar"))
_ROW = """
SELECT visitor_id, external_id, external_id_event, email, email_event, name, name_event, avatar_url, avatar_url_event
FROM customers WHERE id = $1
"""
_OTHERS_OF = """
SELECT event_id, received_at, customer_external_id, payload FROM events
WHERE workspace_id = $1 AND visitor_id = $2 AND customer_external_id IS NOT NULL AND NOT (event_id = ANY($3::uuid[]))
ORDER BY received_at DESC, event_id DESC
"""


async def _unshare(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    row: uuid.UUID,
    external: tuple[str | None, str | None],
    theirs: set[uuid.UUID],
) -> None:
    """A customers row of a visitor the person shares with another customer (one row per
    visitor): each contact field the person's events gave it (its ``…_event``), or their
    external id, becomes what the visitor's other customers' events give it (the latest
    that carries one, as the workers would have made it without the person's), else nothing.
    The visitor id, the other customer's fields, the first touch and the status stay."""
    c = await conn.fetchrow(_ROW, row)
    hers = [
        column
        for column, _ in _CONTACT
        if c[column] is not None
        and (c[f"{column}_event"] in theirs or (column == "external_id" and c[column] in external))
    ]
    if not hers:
        return
    others = []
    for r in await conn.fetch(_OTHERS_OF, workspace_id, c["visitor_id"], sorted(theirs)):
        x = r["customer_external_id"]
        if x in external or erasure.is_pseudonym(x):
            continue
        payload = r["payload"] if isinstance(r["payload"], dict) else orjson.loads(r["payload"] or "{}")
        others.append((r, {**payload, "external_id": x}))
    if others:  # an erased person's, under another spelling, is no one else's
        digests = {erasure.digest(key, EXTERNAL, p["external_id"], workspace_id) for _, p in others}
        gone = {bytes(d) for d in await conn.fetchval(_ERASED, list(digests), workspace_id)}
        others = [
            (r, p) for r, p in others if erasure.digest(key, EXTERNAL, p["external_id"], workspace_id) not in gone
        ]
    sets: list[str] = []
    args: list[Any] = [row]
    for column, field_ in _CONTACT:
        if column not in hers:
            continue
        by = next(((r, p[field_]) for r, p in others if isinstance(p.get(field_), str) and p[field_]), None)
        value, at, event = (by[1], by[0]["received_at"], by[0]["event_id"]) if by else (None, None, None)
        n = len(args)
        sets.append(f"{column} = ${n + 1}, {column}_at = ${n + 2}, {column}_event = ${n + 3}")
        args += [value, at, event]
    await conn.execute(f"UPDATE customers SET {', '.join(sets)} WHERE id = $1", *args)


_ERASED = """
SELECT array(SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2)
"""
_COMMISSIONS = """
SELECT id FROM commissions
WHERE workspace_id = $1 AND (customer_external_id = $2 OR source_id = ANY($3::uuid[]))
"""
_TWIN = "SELECT id FROM customers WHERE workspace_id = $1 AND visitor_id = $2 AND id <> $3"


async def _merged(conn: asyncpg.Connection, workspace_id: str, row: uuid.UUID, alias: str) -> bool:
    """Where the workers already made the visitor's row under its pseudonym (from a scrubbed
    copy of an event that reached them before this scrub did), the two rows become one.
    Whether this row went (the other, scrubbed already, stays)."""
    twin = await conn.fetchval(_TWIN, workspace_id, alias, row)
    if twin is None:
        return False
    first = await conn.fetchval(
        "SELECT id FROM customers WHERE id = ANY($1::uuid[]) ORDER BY first_seen_at, id LIMIT 1", [row, twin]
    )
    gone = twin if first == row else row
    await conn.execute(
        "UPDATE customers k SET status = greatest(k.status, d.status), last_seen_at = greatest(k.last_seen_at,"
        " d.last_seen_at) FROM customers d WHERE k.id = $1 AND d.id = $2",
        first,
        gone,
    )
    await conn.execute("DELETE FROM customers WHERE id = $1", gone)
    return gone == row


def _dedupe(
    key: str | None, external_id: str | None, x_alias: str | None, visitor: str | None, v_alias: str | None
) -> str | None:
    """The dedupe key the workers would compute for the scrubbed event (``workers.consumer.dedupe.dedupe_key``)."""
    if key is None:
        return None
    lead = f"lead\x1f{external_id}\x1f"
    if external_id is not None and x_alias is not None and key.startswith(lead):
        return f"lead\x1f{x_alias}\x1f" + key[len(lead) :]
    if visitor and v_alias and key.endswith(":" + visitor):
        return key[: -len(visitor)] + v_alias
    return key


def _enrichment(doc: Any) -> Any:
    if doc is None:
        return None
    d = doc if isinstance(doc, dict) else orjson.loads(doc)
    return {k: (None if k in erasure.ENRICHMENT_PERSONAL else v) for k, v in d.items()}


def uuid_floor(at: datetime) -> uuid.UUID:
    """The lowest UUIDv7 of ``at``'s millisecond: a bound the events' partitions prune on."""
    ms = max(0, int(at.timestamp() * 1000))
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62))


def _count(status: str) -> int:
    return int(status.rpartition(" ")[2])


def _pseudonyms(values: dict[str, str | None]) -> dict[str, str]:
    """The person's ids among ``values`` (each raw id to its pseudonym; their other values,
    an address or an email, go by where they sit: ``erasure.redact_person``)."""
    return {v: alias for v, alias in values.items() if alias is not None}


async def _redact_flags(conn: asyncpg.Connection, ids: list[uuid.UUID], values: dict[str, str | None]) -> int:
    """The evidence of the person's events' flags, by identity: theirs goes (an email, an
    address), the affiliate's beside it stays (a self-referral's ``affiliate_email``)."""
    n = 0
    aliases = _pseudonyms(values)
    for r in await conn.fetch("SELECT event_id, rule, evidence FROM event_flags WHERE event_id = ANY($1::uuid[])", ids):
        doc = orjson.loads(r["evidence"]) if isinstance(r["evidence"], str) else r["evidence"]
        if (new := erasure.redact_person(doc, aliases, hers=True)) != doc:
            await conn.execute(
                "UPDATE event_flags SET evidence = $3::text::jsonb WHERE event_id = $1 AND rule = $2",
                r["event_id"],
                r["rule"],
                orjson.dumps(new).decode(),
            )
            n += 1
    return n


async def _redact_deliveries(conn: asyncpg.Connection, ids: list[uuid.UUID], values: dict[str, str | None]) -> int:
    """The payloads whose subject is one of the person's (their events, sales, commissions),
    by identity: the customer object and the event's own fields about them, never the
    link, the affiliate, or a string of the sale's that equals one of theirs (an invoice)."""
    n = 0
    aliases = _pseudonyms(values)
    rows = await conn.fetch("SELECT id, payload FROM webhook_deliveries WHERE subject_id = ANY($1::uuid[])", ids)
    for r in rows:
        doc = orjson.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
        if (new := erasure.redact_person(doc, aliases, hers=True)) != doc:
            await conn.execute(
                "UPDATE webhook_deliveries SET payload = $2::text::jsonb WHERE id = $1",
                r["id"],
                orjson.dumps(new).decode(),
            )
            n += 1
    return n
