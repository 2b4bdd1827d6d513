"""An erasure's third step (``ingest.privacy.erasure``): the person's stored rows scrubbed,
one transaction, behind the ledger's fence. ``scrub_rows`` in its order (the order of its
statements is the order of the locks a worker's batch takes too): the person's events found
(``_theirs``), the click_burst windows of their clicks gone, each event scrubbed in memory
(``_Scan``), what the scan found beyond its indexes asked of the ledger (``_widen``), their
customers rows read behind their locks (``erasure_customers.read``), then written: the
events, their visits and dedupe keys, the customers rows, the sales, leads and commissions
renamed, the flags' evidence and the webhook payloads redacted (``erasure_redact``), and the
affiliates' per-IP rows of their addresses deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure, jsonrows, link_keys, referrers
from ingest.contract.erasure import EXTERNAL, VISITOR
from ingest.contract.events import Envelope, EventType
from ingest.contract.fraud import BURST_WINDOW_TABLES
from ingest.privacy import erasure_customers, erasure_redact

# the person's events, from a month before their first event (their visitors' clicks may
# precede it), or from the first when none is known: each way of naming them an index range
# of its own (events_workspace_customer, _visitor_known, _named_click, the primary key), never a
# scan of the workspace's events. A click whose click id is its own is the primary key's (the
# index by click holds only the rows naming another's: schema 20)
_EVENTS = """
SELECT event_id, type, link_id, received_at, dialect, visitor_id, visitor_key, customer_external_id,
       dedupe_key, enrichment, payload, host(ip) AS ip, event_user_agent(user_agent, agent_id) AS user_agent,
       referrer, click_id, device_id
FROM events
WHERE workspace_id = $1 AND event_id >= $5 AND event_id = ANY(ARRAY(
    SELECT event_id FROM events WHERE workspace_id = $1 AND customer_external_id = $2 AND event_id >= $5
    UNION SELECT event_id FROM events WHERE workspace_id = $1 AND visitor_id = ANY($3::text[]) AND event_id >= $5
    UNION SELECT event_id FROM events WHERE event_id = ANY($4::uuid[]) AND workspace_id = $1 AND event_id >= $5
    UNION SELECT event_id FROM events
          WHERE workspace_id = $1 AND click_id = ANY($4::uuid[]) AND click_id <> event_id AND event_id >= $5
))
"""
_SHARED_KEYS = f"""
SELECT DISTINCT link_id, (received_at AT TIME ZONE 'UTC')::date AS day, visitor_key FROM events
WHERE {link_keys.of_links("link_id", "$1")} AND visitor_key = ANY($2::text[]) AND NOT (event_id = ANY($3::uuid[]))
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
),
kept AS (
    INSERT INTO link_visitor_days (link_id, day, visitor_key) SELECT * FROM gone ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING RETURNING link_id, day
),
merged AS MATERIALIZED (  -- a raw key whose pseudonym's is held already: two visitor-days made one
    SELECT link_id, day, count(*) AS n
    FROM (SELECT link_id, day FROM gone EXCEPT ALL SELECT link_id, day FROM kept) m GROUP BY 1, 2
),
locked AS MATERIALIZED (  -- in the workers' order: visitor-days, then links by id, then days
    SELECT id FROM links WHERE id IN (SELECT link_id FROM merged) ORDER BY id FOR NO KEY UPDATE
),
linked AS (
    UPDATE links l SET unique_clicks = l.unique_clicks - t.n
    FROM locked k, (SELECT link_id, sum(n)::bigint AS n FROM merged GROUP BY 1) t
    WHERE l.id = k.id AND t.link_id = k.id
    RETURNING 1
)
UPDATE daily_stats s SET unique_clicks = s.unique_clicks - m.n
FROM merged m WHERE s.link_id = m.link_id AND s.day = m.day AND (SELECT count(*) FROM linked) >= 0
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


@dataclass(slots=True)
class _Scan:
    """The person's event rows scrubbed in memory, one by one (``take``): what each of their
    values becomes, the rows' new columns, the visits and dedupe keys to rename, and the
    visitors and clicks found beyond those the scrub was given."""

    key: bytes
    workspace_id: str
    visitors: list[str]
    clicks: list[uuid.UUID]
    shared_visitors: Sequence[str]
    shared: set[str]  # the hashed visitor keys someone else's click holds too
    values: dict[str, str | None] = field(default_factory=dict)  # -> what it becomes
    more_visitors: set[str] = field(default_factory=set)
    more_clicks: set[uuid.UUID] = field(default_factory=set)
    changed: list[tuple[Any, ...]] = field(default_factory=list)
    visits: set[tuple[Any, ...]] = field(default_factory=set)
    dedupes: list[tuple[Any, ...]] = field(default_factory=list)

    def take(self, r: asyncpg.Record) -> None:
        key, workspace_id, values = self.key, self.workspace_id, self.values
        payload = r["payload"] if isinstance(r["payload"], dict) else orjson.loads(r["payload"] or "{}")
        e = Envelope(EventType(r["type"]), r["dialect"], payload, workspace_id, event_id=r["event_id"])
        scrubbed = erasure.scrub(key, e, workspace_id)
        visitor = r["visitor_id"]
        v_alias = visitor
        if visitor is not None and not erasure.is_pseudonym(visitor):
            v_alias = values[visitor] = erasure.pseudonym(key, VISITOR, visitor)
            if visitor not in self.visitors and visitor not in self.shared_visitors:
                self.more_visitors.add(visitor)
        if r["type"] == EventType.CLICK and r["event_id"] not in self.clicks:
            self.more_clicks.add(r["event_id"])
        if (named := r["click_id"]) is not None and named not in self.clicks:  # a lead of one of their visitors
            self.more_clicks.add(named)
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
        elif vkey is not None and vkey.startswith("h:") and vkey not in self.shared:
            new_vkey = erasure.pseudonym(key, "h", vkey)
        raw = r["customer_external_id"]  # the erased id, or another carried by this visitor's event
        cust = raw
        if raw is not None and not erasure.is_pseudonym(raw):
            values[raw] = cust = erasure.pseudonym(key, EXTERNAL, raw, workspace_id)
        dedupe = _dedupe(r["dedupe_key"], raw, cust, visitor, v_alias)
        self.changed.append(
            (
                r["event_id"],
                v_alias,
                new_vkey,
                cust,
                dedupe,
                _enrichment(r["enrichment"], r["device_id"], r["referrer"]),
                scrubbed.payload,
            )
        )
        if r["type"] == EventType.CLICK and new_vkey != vkey and r["link_id"] is not None:
            self.visits.add((r["link_id"], r["received_at"].astimezone(UTC).date(), vkey, new_vkey))
        if dedupe != r["dedupe_key"]:
            self.dedupes.append((workspace_id, r["type"], r["dedupe_key"], dedupe))


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
    fields the person's events gave it go (``erasure_customers``). The rows changed per table, the
    visitors and clicks found that are the person's too, and their addresses."""
    floor = uuid_floor(since - timedelta(days=31)) if since is not None else uuid.UUID(int=0)
    x_alias = erasure.pseudonym(key, EXTERNAL, external_id, workspace_id) if external_id is not None else None
    found = await _theirs(conn, key, workspace_id, (external_id, x_alias), visitors, clicks, floor)
    windows = await _drop_windows(conn, found)
    ids = [r["event_id"] for r in found]
    scan = _Scan(key, workspace_id, visitors, clicks, shared_visitors, await _shared_keys(conn, found, ids))
    if external_id is not None:
        scan.values[external_id] = x_alias
    for r in found:
        scan.take(r)
    shared_visitors = await _widen(conn, scan, external_id)
    people, mine = await erasure_customers.read(
        conn, key, workspace_id, external_id, visitors, shared_visitors, scan.values
    )
    rows = await _write_events(conn, scan)
    theirs = {r["event_id"] for r in found if r["customer_external_id"] in (external_id, x_alias) and external_id}
    rows["customers"] = await erasure_customers.scrub(
        conn, key, workspace_id, (external_id, x_alias), people, mine, theirs
    )
    rows |= await _rename(conn, workspace_id, external_id, x_alias)
    rows["event_flags"] = await erasure_redact.redact_flags(conn, ids, scan.values)
    rows["webhook_deliveries"] = await erasure_redact.redact_deliveries_of(
        conn, workspace_id, x_alias, ids, scan.values
    )
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
    return rows, sorted(scan.more_visitors), sorted(scan.more_clicks), ips


async def _drop_windows(conn: asyncpg.Connection, found: list[asyncpg.Record]) -> dict[str, int]:
    # the click_burst rule's windows of the person's clicks (workers/consumer/bursts.py),
    # keyed by their address: gone, so a later count of the pair starts afresh. First of
    # the rows it writes: a batch locks a window before the other tables it shares with this
    pairs = sorted({(r["link_id"], r["ip"]) for r in found if r["ip"] and r["type"] == 1 and r["link_id"]})
    return {
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


async def _shared_keys(conn: asyncpg.Connection, found: list[asyncpg.Record], ids: list[uuid.UUID]) -> set[str]:
    # a visitor key made of IP and User-Agent that someone else's click shares stays: it is theirs too
    hashed = sorted({k for r in found if (k := r["visitor_key"]) is not None and k.startswith("h:")})
    links = sorted({r["link_id"] for r in found if r["link_id"] is not None})
    return {r["visitor_key"] for r in await conn.fetch(_SHARED_KEYS, links, hashed, ids)} if hashed else set()


async def _widen(conn: asyncpg.Connection, scan: _Scan, external_id: str | None) -> Sequence[str]:
    """The shared visitors, with those of the scan's finds another customer holds too (taken
    out of its finds)."""
    shared_visitors = scan.shared_visitors
    # what the scan found beyond what it was given is theirs only where no other customer
    # holds it too (a lead of theirs on a browser another signed up from)
    if scan.more_visitors or scan.more_clicks:  # (the customers rows are read after: of those visitors too)
        also_v, also_c = await erasure.held_by_others(
            conn, scan.key, scan.workspace_id, external_id, sorted(scan.more_visitors), sorted(scan.more_clicks)
        )
        scan.more_visitors -= also_v
        scan.more_clicks -= also_c
        shared_visitors = [*shared_visitors, *sorted(also_v)]
    return shared_visitors


async def _write_events(conn: asyncpg.Connection, scan: _Scan) -> dict[str, int]:
    rows = {"events": len(scan.changed)}
    if scan.changed:
        await conn.execute(_UPDATE_EVENTS, jsonrows.doc(sorted(scan.changed)))
    if scan.visits:
        await conn.execute(_RENAME_VISITS, jsonrows.doc(sorted(scan.visits)))
    rows["link_visitor_days"] = len(scan.visits)
    if scan.dedupes:
        await conn.execute(_RENAME_DEDUPE, jsonrows.doc(sorted(scan.dedupes)))
    rows["event_dedupe"] = len(scan.dedupes)
    return rows


async def _rename(
    conn: asyncpg.Connection, workspace_id: str, external_id: str | None, x_alias: str | None
) -> dict[str, int]:
    """The person's sales, leads and commissions under their pseudonym (a sale's metadata gone)."""
    rows: dict[str, int] = {}
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
    return rows


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
    erased = {digests[bytes(d)] for d in await conn.fetchval(erasure_customers.ERASED, list(digests), workspace_id)}
    return [r for r in found if r["customer_external_id"] not in named - erased]


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


def _enrichment(doc: Any, device: int | None, referrer: str | None) -> Any:
    """The row's enrichment once erased: its personal fields None. A row of a device whose
    document leaves its referrer's domain to the ``referrer`` column (schema 26), which the
    erasure clears, gets the domain written in, as the document held it before."""
    d = None if doc is None else doc if isinstance(doc, dict) else orjson.loads(doc)
    if device is not None and "referrer_domain" not in (d or {}):
        d = {**(d or {}), "referrer_domain": referrers.derived(referrer)}
    if d is None:
        return None
    return {k: (None if k in erasure.ENRICHMENT_PERSONAL else v) for k, v in d.items()}


def uuid_floor(at: datetime) -> uuid.UUID:
    """The lowest UUIDv7 of ``at``'s millisecond: a bound the events' partitions prune on."""
    ms = max(0, int(at.timestamp() * 1000))
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62))


def _count(status: str) -> int:
    return int(status.rpartition(" ")[2])
