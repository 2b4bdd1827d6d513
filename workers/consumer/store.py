"""One Postgres transaction per batch: events in, counters moved, exactly once in effect.

The event rows are inserted with ON CONFLICT DO NOTHING RETURNING, and counters move only
from the rows that came back: a redelivered, reclaimed or replayed entry inserts nothing
and so moves nothing. Every write is set-based (the batch's rows as one jsonb document,
see ``jsonrows``), one statement per table, and sorted so that concurrent batches take their
locks in one order and cannot deadlock one another. The order, phase by phase, each phase
in key order: the erasure ledger's advisory lock (shared; an erased person's events are
stored scrubbed: ``ingest.contract.erasure``), event_dedupe (by dedupe key), burst_windows
(by link and address: ``bursts``), events (by event id), event_flags,
link_visitor_days, links (by id), daily_stats, affiliates (by id), affiliate_milestones,
customers, sales and sale_stats (``sales``), webhook_deliveries, event_drops, drop_stats.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import clicks, erasure, jsonrows, plans
from ingest.contract.connections import skip_next_reset
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.links import LINK_SELECT, LinkInfo
from ingest.ledger import outbox
from ingest.privacy import erasure_late
from workers.consumer import (
    counters,
    customers,
    devices,
    drops,
    event_row,
    fraud,
    key_copies,
    notices,
    refunds,
    sales,
)
from workers.consumer.enrich import Enricher, Found
from workers.consumer.event_row import EventRow
from workers.consumer.stored import Stored, ts
from workers.group.errors import retried_in_place

log = structlog.get_logger("workers.store")

# the batch's links with what the batch needs of their workspace (policies) and program
# (fraud thresholds): one round trip, where three queries took three; one plan, whatever
# the codes (``ingest.contract.plans``)
_RESOLVE_LINKS = f"""
SELECT x.*, w.ip_policy, w.bot_policy, w.fraud_policy, p.fraud_thresholds,
       array(SELECT DISTINCT t FROM webhooks h, unnest(h.events) t WHERE h.workspace_id = w.id AND h.active)
         AS webhook_events
FROM ({LINK_SELECT} WHERE l.code = {plans.any_of(3, "text")}) x
JOIN workspaces w ON w.id = x.workspace_id
LEFT JOIN programs p ON p.id = x.program_id
"""
VISITOR_DIALECTS = frozenset({Dialect.BIORE, Dialect.AFFITOR, Dialect.REDIRECT, Dialect.DUB})

# A lead's or conversion's dedupe key (one lead per customer and event name, one conversion
# per code and referred session) is claimed first, in key order; only the events whose key
# came back (or that have none) are inserted, in event-id order. A key lives in
# event_dedupe, not in a unique index on events: an index on the partitioned table would
# have to hold the partition key, and a key must outlive its event's partition.
_CLAIM_KEYS = f"""
INSERT INTO event_dedupe (workspace_id, type, dedupe_key, event_id, received_at)
{jsonrows.select(("uuid", "smallint", "text", "uuid", "timestamptz"))}
ORDER BY 1, 2, 3, 4  -- the lowest event id takes a key repeated within the batch
ON CONFLICT DO NOTHING
RETURNING event_id
"""
_INSERT_EVENTS = f"""
INSERT INTO events ({", ".join(name for name, _ in event_row.COLUMNS)})
{jsonrows.select([t for _, t in event_row.COLUMNS])}
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
-- below the retention's horizon, its partition may have been dropped: a copy of an event
-- counted long ago cannot be told from a first delivery, so it is stored and moves nothing
RETURNING event_id, (event_id < (SELECT horizon_id FROM event_retention)) IS TRUE AS expired
"""
# Why that order. An insert waits when another open transaction holds the same key: a
# dedupe key in event_dedupe, or an event id in events. Keys are all claimed (statement
# one) before any event row is inserted (statement two), each statement in one global
# order, so a wait in statement one is on a batch in statement one or later, holding keys
# only behind ours in that order or no longer waiting on keys at all; and a wait in
# statement two is on an event id: an event with a key is inserted only by the batch that
# claimed its key (the same id always carries the same key), so that wait is on a copy
# without a key, at its place in event-id order. None is circular. (Advisory locks per key
# would also do, but cost a round trip and a lock-table entry per key: a 10,000-event batch
# is more than the default table holds.)


@dataclass(frozen=True, slots=True)
class Effects:
    """What a batch does besides storing rows and moving counters. The workers do it all;
    an import (``workers.ops.imports``) of history sends no webhooks, flags no fraud and
    earns no commissions unless asked to: its events happened long ago, and were paid for
    (or flagged) in the system they come from."""

    webhooks: bool = True  # outbox deliveries (sale.created, commission.created, milestones, ...)
    fraud: bool = True  # fraud rules run, flags stored (and an excluding policy applied)
    # an import's rows (the ``import`` dialect) earn commissions: an import run with
    # --commissions. Live rows always do, and so does a live sale an imported lead attributes;
    # the ledger's clawbacks and reversals follow whatever the flag
    commissions: bool = True
    imported: bool = False  # an import's batch (``commissions`` then says whether its rows earn)
    # the counters (links, daily stats, affiliates: the rows every live batch of those links
    # writes too) moved last, just before the commit, so that a live batch waits for them
    # only that long (an import's batch: its customers, sales and drops are of other days).
    # Its lock order is then not the live one's; a deadlock between the two, possible only
    # where both name one customer or one day's drop row, is detected and retried in place
    counters_last: bool = False


LIVE = Effects()


@dataclass(slots=True)
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    unknown_codes: list[str] = field(default_factory=list)
    inactive_codes: list[str] = field(default_factory=list)
    milestones: int = 0
    expired: int = 0  # stored below the retention's horizon: counted nothing
    deliveries: list[str] = field(default_factory=list)  # webhook outbox rows to enqueue after COMMIT
    # refunds' copies not restored: their sale is missing, or past (workers.consumer.refunds)
    refunds_not_restored: list[Envelope] = field(default_factory=list)
    scrubbed: int = 0  # events of erased people, stored without their personal data
    # events this batch stored no row for (an unknown or inactive link, a duplicate's key): an
    # erasure's sweep cannot find their entries by a row (``ingest.contract.erasure_index``)
    rowless: set[UUID] = field(default_factory=set)
    copies: set[UUID] = field(default_factory=set)  # events a row held already: this batch's were copies
    # stored in the transaction of another partition's batch, whose result counts its
    # events (workers.consumer.combine): this one's counts are all zero
    joined: bool = False


def _inet(ip: str | None) -> str | None:
    # the edge sends what the socket said; anything else is not stored rather than failing
    if ip is None:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


async def write_batch(
    pool: asyncpg.Pool, envelopes: list[Envelope], enricher: Enricher | None = None, effects: Effects = LIVE
) -> BatchResult:
    """Store a batch in one transaction; deadlocks and serialization failures retried.
    Refunds' copies follow, each in a transaction of its own (``workers.consumer.refunds``):
    after the batch, whose sales they may refund."""
    copies = [e for e in envelopes if e.type is EventType.REFUND]
    if copies:
        envelopes = [e for e in envelopes if e.type is not EventType.REFUND]
    result = await _write_retried(pool, envelopes, enricher, effects) if envelopes or not copies else BatchResult()
    if copies:
        restored = await refunds.restore(pool, copies)
        result.inserted += restored.restored
        result.duplicates += restored.duplicates
        result.refunds_not_restored = restored.not_restored
    return result


async def _write_retried(
    pool: asyncpg.Pool, envelopes: list[Envelope], enricher: Enricher | None, effects: Effects
) -> BatchResult:
    async def run() -> BatchResult:
        async with pool.acquire() as conn:
            # before the batch's transaction: an entry is made once, committed at once, and
            # held by no batch's lock (a batch rolled back leaves it, unnamed: no one's data)
            visitors, agents = _named(envelopes)
            known = await devices.ids(conn, enricher, visitors, agents=agents)
            async with conn.transaction():
                result = await _write(conn, envelopes, enricher, effects, known)
            # committed, and nothing of it outlives its transaction (no session setting, lock,
            # cursor or LISTEN): the pool's reset would find nothing to undo
            skip_next_reset(conn)
            return result

    return await retried_in_place(run, "batch")


async def _claim_keys(conn: asyncpg.Connection, batch: list[EventRow]) -> tuple[list[EventRow], list[UUID]]:
    """Claim the batch's dedupe keys; the event rows to insert come back: those without a
    key, and those whose key this batch now holds (in event-id order still); and the ids of
    the events whose key was held already (by another event, or by their own earlier copy)."""
    keyed = [r for r in batch if r.dedupe_key is not None]
    if not keyed:
        return batch, []
    claims = [(r.workspace_id, r.type, r.dedupe_key, r.event_id, r.received_at) for r in keyed]
    claimed = {r["event_id"] for r in await conn.fetch(_CLAIM_KEYS, jsonrows.doc(claims))}
    keep = [r for r in batch if r.dedupe_key is None or r.event_id in claimed]
    lost = [r.event_id for r in keyed if r.event_id not in claimed]
    return keep, lost


def _opt(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _dedupe_key(e: Envelope) -> str | None:
    if e.type is EventType.LEAD and isinstance(e.payload.get("external_id"), str):
        return f"lead\x1f{e.payload['external_id']}\x1f{e.payload.get('name') or ''}"
    # a conversion per (code, session); a click spooled under an idempotency key per key
    # (the edge could not check the key without Redis: ingest/edge/idempotency.py)
    return _opt(e.payload.get("dedupe"))


BROWSER_KEYS = 65_536  # (address, User-Agent) pairs whose visitor key this process remembers
_browser_keys: dict[tuple[str | None, str | None], str] = {}


def _visitor_key(e: Envelope) -> str | None:
    if visitor := _opt(e.payload.get("visitor_id")):
        return visitor
    if e.ip or e.user_agent:  # seed 000 sends no visitor: the browser is what we have
        pair = (e.ip, e.user_agent)
        key = _browser_keys.get(pair)
        if key is None:  # a browser clicks again and again: its digest taken once (memory only)
            if len(_browser_keys) >= BROWSER_KEYS:
                _browser_keys.clear()
            key = _browser_keys[pair] = "h:" + hashlib.sha256(f"{e.ip}|{e.user_agent}".encode()).hexdigest()[:24]
        return key
    return None


def _out_of_window(e: Envelope, link: LinkInfo) -> bool:
    """A lead or conversion whose click (its click id carries the click's UUIDv7 time) is
    older than the program's cookie window."""
    if e.type is EventType.CLICK:
        return False
    click = clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None
    if click is None:
        return False  # no click to measure from (a Bricqs conversion by code)
    clicked_ms = click.int >> 80
    return e.received_at_ms - clicked_ms > link.cookie_window_days * 86_400_000


def _named(envelopes: list[Envelope]) -> tuple[list[tuple[str | None, str | None]], set[str]]:
    """What ``devices.ids`` makes the entries of: the (User-Agent, address) of each enriched
    click, and every User-Agent's text."""
    return [(e.user_agent, e.ip) for e in envelopes if _enriched(e)], {e.user_agent for e in envelopes if e.user_agent}


def _enriched(e: Envelope) -> bool:
    """A click from a browser: a batch click carries its visitor's IP and User-Agent when the
    forwarding server knew them."""
    visitor = e.dialect in VISITOR_DIALECTS or (e.dialect == Dialect.NATIVE and e.user_agent is not None)
    return visitor and e.type is EventType.CLICK


def _enrich(e: Envelope, enricher: Enricher | None, policy: str) -> tuple[str | None, Found | None]:
    """(ip to store, enrichment). Only browser-facing dialects carry the visitor's IP and
    User-Agent; a server-to-server call's are its server's, not worth a geo or bot verdict."""
    if enricher is None:
        return _inet(e.ip) if policy == "full" else None, None
    if _enriched(e):
        found = enricher.enrich_row(e.ip, e.user_agent, _opt(e.payload.get("referrer")), policy)
        return found.ip, found
    return enricher.stored_ip(e.ip, policy), None


async def _write(
    conn: asyncpg.Connection,
    envelopes: list[Envelope],
    enricher: Enricher | None,
    effects: Effects = LIVE,
    known: devices.Known | None = None,
) -> BatchResult:
    result = BatchResult()
    # a requeued or spooled copy beside its original: one row per event id, the copy is a duplicate
    unique: dict[UUID, Envelope] = {}
    for e in envelopes:
        unique.setdefault(e.event_id, e)
    result.duplicates = len(envelopes) - len(unique)
    everything = list(unique.values())
    codes = sorted(
        {c for e in everything if e.type is not EventType.SALE and isinstance(c := e.payload.get("code"), str)}
    )
    # the ledger before anything else is read (the module's doc), and the batch's links in
    # the same statement: one round trip
    ledger, link_rows = await erasure.Ledger.read_with(conn, everything, then=erasure.Then(_RESOLVE_LINKS, (codes,)))
    by_code: dict[str, LinkInfo] = {}
    policies: dict[str, Any] = {}  # workspace id -> its row (ip_policy, bot_policy, fraud_policy)
    thresholds: dict[str, object] = {}  # program id -> its fraud_thresholds as stored
    for r in link_rows:
        info = by_code[r["code"]] = LinkInfo.from_record(r)
        policies[info.workspace_id] = r
        if info.program_id is not None:
            thresholds[info.program_id] = r["fraud_thresholds"]
    if ledger.erased:  # an erased person's events are stored scrubbed (ingest.contract.erasure)
        workspaces = {
            id(e): by_code[c].workspace_id
            for e in everything
            if isinstance(c := e.payload.get("code"), str) and c in by_code
        }
        originals = ledger.scrubbed(everything, workspaces)
        originals += key_copies.in_batch(ledger.key, everything, originals, workspaces)
        result.scrubbed = len(originals)
        # a copy of their keyed event an earlier batch stored holds the key's row: theirs too
        originals += await key_copies.stored(conn, originals, [e.event_id for e in everything])
        # one that links the person to a visitor or a click their erasure could not know (a
        # lead that arrives late): those join the ledger, and their rows are scrubbed now
        # what they teach the ledger (a late lead's click is the person's), and the erasure
        # pending again for the sweep; the click's row scrubbed now, and this batch's copy
        if await erasure.learn(conn, ledger.key, originals):
            await erasure_late.follow(conn, ledger.key, originals)
            again = await erasure.Ledger.read(conn, everything)
            result.scrubbed += len(again.scrubbed(everything, workspaces))
    envelopes = [e for e in everything if e.type is not EventType.SALE]
    # the devices and places made before the transaction (``known``, for these envelopes as
    # they came), and any other made here (held until the commit): an erased person's click
    # is enriched without its User-Agent and address, so only a scrub can name one not made
    if known is None or result.scrubbed:
        visitors, agents = _named(envelopes)
        known = await devices.ids(conn, enricher, visitors, known, agents=agents)
    sold = [e for e in everything if e.type is EventType.SALE]  # stored last (workers/consumer/sales.py)
    # bot_policy "count": a bot's click is a click too (still is_bot, still in bot_clicks).
    # Decided here, once per batch, and recorded on the row (bot_counted) for reconcile
    counting = {ws for ws, r in policies.items() if r["bot_policy"] == "count"}

    batch: list[EventRow] = []
    kept: dict[UUID, Stored] = {}
    no_row: list[drops.NoRow] = []  # dropped with no event row: counted once by event id
    for e in sorted(envelopes, key=lambda e: e.event_id.int):  # UUID order; ints compare in C, UUIDs in Python
        code = e.payload.get("code")
        link = by_code.get(code) if isinstance(code, str) else None
        if link is None or (e.workspace_id is not None and e.workspace_id != link.workspace_id):
            result.unknown_codes.append(str(code))
            no_row.append(drops.NoRow(e.event_id, e.workspace_id, None, "unknown_code", ts(e.received_at_ms)))
            continue
        if e.type is EventType.CLICK and not link.active:
            result.inactive_codes.append(link.code)
            no_row.append(drops.NoRow(e.event_id, link.workspace_id, link.id, "inactive_link", ts(e.received_at_ms)))
            continue
        ws = policies.get(link.workspace_id)
        ip, found = _enrich(e, enricher, ws["ip_policy"] if ws else "full")
        is_bot = found is not None and found.is_bot
        click_id = clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None
        visitor = _opt(e.payload.get("visitor_id"))
        at = ts(e.received_at_ms)
        p = e.payload
        # positional, in the columns' order (each named after it): a call by keyword of
        # EventRow's 28 fields took 1.5 µs more a row than this
        row = EventRow(
            e.event_id,  # event_id
            int(e.type),  # type
            link.workspace_id,  # workspace_id
            link.id,  # link_id
            link.program_id,  # program_id
            link.affiliate_id,  # affiliate_id
            click_id,  # click_id
            visitor,  # visitor_id
            _opt(p.get("external_id")),  # customer_external_id
            _opt(p.get("name")),  # name
            _dedupe_key(e),  # dedupe_key
            e.dialect,  # dialect
            p.get("test_mode") is True,  # test_mode
            is_bot,  # is_bot
            at,  # received_at
            ip,  # ip
            None,  # user_agent: by its id (schema 20)
            _opt(p.get("referrer")),  # referrer
            found.country if found else None,  # country
            found.asn if found else None,  # asn
            event_row.row_fields(found.bot_reason, found.referrer_domain, found.ip) if found else None,  # enrichment
            _visitor_key(e),  # visitor_key
            _out_of_window(e, link),  # out_of_window
            # payload: a click's without its ids (a lead's or conversion's the erasure's scrub
            # of its row reads: a conversion's dedupe key holds its visitor id)
            event_row.row_payload(p, link.code, click=click_id, visitor=visitor)
            if e.type is EventType.CLICK
            else event_row.row_payload(p, link.code),
            is_bot and link.workspace_id in counting,  # bot_counted
            known.devices[found.device] if found else None,  # device_id
            known.places[found.place] if found and found.place.count(None) < len(found.place) else None,  # place_id
            known.agents[e.user_agent] if e.user_agent else None,  # agent_id
        )
        batch.append(row)
        kept[e.event_id] = Stored(
            e, link, at, is_bot, row.visitor_key, row.out_of_window, ip, found.bot_reason if found else None
        )

    if not kept:
        sold_out = await _sales(conn, sold, [], result, effects=effects)
        result.rowless = {n.event_id for n in [*no_row, *sold_out.drops]}
        if sold_out.notices and effects.webhooks:
            result.deliveries = await outbox.record_deliveries(conn, sold_out.notices)
        await drops.settle(conn, inserted=[], no_row=no_row + sold_out.drops, taken_back=sold_out.undrops)
        return result
    claiming = batch
    batch, lost = await _claim_keys(conn, batch)
    policy = {ws: r["fraud_policy"] or {} for ws, r in policies.items()}
    limits = fraud.thresholds_of(thresholds)
    # the click_burst rule before the insert: a flag the workspace does not exclude is on its row
    burst = (
        await fraud.bursts_before_insert(conn, [kept[r.event_id] for r in batch if not r.test_mode], limits)
        if effects.fraud
        else {}
    )
    if burst:
        batch = [
            EventRow(*r[:-2], c.limits.clicks, c.limits.seconds)  # burst_clicks, burst_seconds: _replace's cost a third
            if (c := burst.get(r.event_id)) is not None and fraud.burst_on_row(policy, c)
            else r
            for r in batch
        ]
    returned = {
        r["event_id"]: r["expired"] for r in await conn.fetch(_INSERT_EVENTS, jsonrows.doc(event_row.plain(batch)))
    }
    inserted = [s for event_id, s in kept.items() if event_id in returned]  # in event-id order
    result.inserted = len(inserted)
    result.duplicates += len(kept) - len(inserted)
    result.copies = set(kept) - set(returned)
    no_row += await _duplicates(conn, [kept[event_id] for event_id in lost])
    if lost:  # an answer may name a keyed copy that lost its key: filed as a copy of the stored one
        gone = set(lost)
        await key_copies.file(
            conn,
            [
                (r.workspace_id, r.type, r.dedupe_key, r.event_id)
                for r in claiming
                if r.event_id in gone and r.dedupe_key
            ],
        )
    result.expired = sum(returned.values())
    # test-mode, out-of-window and expired events are stored, and that is all: no counter,
    # no customer, no attribution, no webhook
    live = [
        s
        for s in inserted
        if s.envelope.payload.get("test_mode") is not True and not s.out_of_window and not returned[s.envelope.event_id]
    ]
    flagged = await fraud.detect(conn, live, policy, limits, burst) if effects.fraud else fraud.Found()
    counted = flagged.counted(live)  # a flag the workspace excludes: stored and flagged, nothing more
    reached: list[counters.MilestoneReached] = []
    unexpired = [s for s in inserted if not returned[s.envelope.event_id]]  # an expired event drops nothing either
    flags = [(f.stored, f.rule, f.excluded) for f in flagged.flags]
    # a batch that locks no row after its counters (only clicks, none making a customer; no
    # sale; no drop without a row to record) writes its drops in the counters' statement,
    # as the last rows it locks still: a round trip fewer
    alone = (
        bool(counted)
        and not effects.counters_last
        and not sold
        and not no_row
        and all(s.type is EventType.CLICK and not customers.makes_one(s) for s in counted)
    )
    if counted and not effects.counters_last:
        dropped = drops.tally(unexpired, counting, flags) if alone else None
        reached = await counters.apply(conn, counted, count_bots=counting, dropped=dropped)
    if counted:
        await customers.upsert(conn, counted)
    sold_out = await _sales(conn, sold, [s for s in counted if s.type is EventType.LEAD], result, counted, effects)

    result.rowless = {n.event_id for n in [*no_row, *sold_out.drops]}

    async def settle() -> None:
        await drops.settle(
            conn,
            inserted=unexpired,
            no_row=no_row + sold_out.drops,
            counting=counting,
            flags=flags,
            taken_back=sold_out.undrops,
        )

    if effects.counters_last:
        await settle()
        if counted:
            reached = await counters.apply(conn, counted, count_bots=counting)
    # the notices of the batch's links, only where their workspace has a webhook for them:
    # most have none, and a notice is a document per event (the outbox's insert joins the
    # webhooks again, at its own snapshot)
    heard = {(ws, t) for ws, r in policies.items() for t in r["webhook_events"]}
    told = [s for s in counted if (s.link.workspace_id, notices.TYPE_OF.get(s.type)) in heard]
    events = notices.for_events(told) if told else []
    if reached and any(t == "milestone.reached" for _, t in heard):
        events += await notices.for_milestones(conn, counted, reached)
    result.milestones = len(reached)
    events += fraud.notices(flagged, lambda ws: (ws, "fraud.flagged") in heard) + sold_out.notices
    if events and effects.webhooks:
        result.deliveries = await outbox.record_deliveries(conn, events)
    if not effects.counters_last and not alone:
        await settle()
    return result


async def _sales(
    conn: asyncpg.Connection,
    sold: list[Envelope],
    leads: list[Stored],
    result: BatchResult,
    counted: list[Stored] | None = None,
    effects: Effects = LIVE,
) -> sales.Settled:
    """The batch's sales, the earlier ones its leads attribute, and the commissions they and
    its counted leads earn, after its events (the lock order in the module's doc); a sale's
    copy counts as a duplicate."""
    out = await sales.settle(conn, sold, leads, counted, import_earns=effects.imported and effects.commissions)
    result.inserted += out.inserted
    result.duplicates += len(sold) - out.inserted
    return out


# of the events whose dedupe key was held already, those it is held by another event for
_HELD_BY_ANOTHER = f"""
SELECT x.event_id
FROM {jsonrows.table(("uuid", "smallint", "text", "uuid"), "x(workspace_id, type, dedupe_key, event_id)")}
JOIN event_dedupe d USING (workspace_id, type, dedupe_key)
WHERE d.event_id <> x.event_id
"""


async def _duplicates(conn: asyncpg.Connection, lost: list[Stored]) -> list[drops.NoRow]:
    """Of the leads and conversions that lost their dedupe key's claim, those whose key
    another event holds (a second lead of one customer and name, a second conversion of
    one code and session): duplicates. A key held by the event's own id is a copy of an
    event stored already (a redelivery, a replay): not a drop; nor is a click's key (an
    idempotency key's, the client's own retry)."""
    keyed = [s for s in lost if s.type in (EventType.LEAD, EventType.CONVERSION)]
    if not keyed:
        return []
    found = await conn.fetch(
        _HELD_BY_ANOTHER,
        jsonrows.doc([(s.link.workspace_id, int(s.type), _dedupe_key(s.envelope), s.envelope.event_id) for s in keyed]),
    )
    others = {r["event_id"] for r in found}
    return [
        drops.NoRow(s.envelope.event_id, s.link.workspace_id, s.link.id, "duplicate", s.at)
        for s in keyed
        if s.envelope.event_id in others
    ]
