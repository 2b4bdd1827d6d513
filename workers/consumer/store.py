"""One Postgres transaction per batch: events in, counters moved, exactly once in effect.

The event rows are inserted with ON CONFLICT DO NOTHING RETURNING, and counters move only
from the rows that came back: a redelivered, reclaimed or replayed entry inserts nothing
and so moves nothing. Every write is set-based (the batch's rows as one jsonb document,
see ``jsonrows``), one statement per table, and sorted so that concurrent batches take their
locks in one order and cannot deadlock one another. The order, phase by phase, each phase
in key order: the erasure ledger's advisory lock (shared; an erased person's events are
stored scrubbed: ``ingest.contract.erasure``, ``erased``), event_dedupe (by dedupe key:
``dedupe``), burst_windows (by link and address: ``bursts``; only the clicks of
workspaces that exclude the click_burst rule), events (by event id; with them, one
``burst_pending`` row: the batch's other clicks, which ``burst_pass`` judges after the
commit), event_flags, link_visitor_days, links (by id), daily_stats, affiliates (by id), affiliate_milestones,
customers, sales and sale_stats (``sales``), webhook_deliveries, event_drops, drop_stats.

``_write`` is that order as named steps over one batch's state (``_Batch``), each step's
statements in the order of the list above; the rows themselves are built in memory
(``rows``) before the first of them that locks anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import erasure, jsonrows, plans
from ingest.contract.connections import skip_next_reset
from ingest.contract.events import Envelope, EventType
from ingest.contract.links import LINK_SELECT, LinkInfo
from ingest.ledger import outbox, placement
from workers.consumer import (
    bursts,
    counters,
    customers,
    dedupe,
    devices,
    drops,
    erased,
    event_row,
    fraud,
    notices,
    refunds,
    rows,
    sales,
)
from workers.consumer.enrich import Enricher
from workers.consumer.event_row import EventRow
from workers.consumer.stored import Stored
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
# statement two, after the dedupe keys' claim (``dedupe``: why in that order)
_INSERT_EVENTS = f"""
INSERT INTO events ({", ".join(name for name, _ in event_row.COLUMNS)})
{jsonrows.select([t for _, t in event_row.COLUMNS])}
ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
-- below the retention's horizon, its partition may have been dropped: a copy of an event
-- counted long ago cannot be told from a first delivery, so it is stored and moves nothing
RETURNING event_id, (event_id < (SELECT horizon_id FROM event_retention)) IS TRUE AS expired
"""
# the same, where the batch has clicks for the click_burst rule to judge after the commit
# ($2: their event ids): those inserted, and not expired, go in one ``burst_pending`` row,
# in the same statement (no round trip more), so that the commit that stores them also
# leaves them to judge (``workers.consumer.burst_pass``)
_INSERT_EVENTS_PENDING = f"""
WITH ins AS ({_INSERT_EVENTS}),
pending AS (
    INSERT INTO burst_pending (clicks)
    SELECT array_agg(i.event_id ORDER BY i.event_id) FROM ins i JOIN unnest($2::uuid[]) AS j (id) ON j.id = i.event_id
    WHERE NOT i.expired
    HAVING count(*) > 0
)
SELECT event_id, expired FROM ins
"""


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
    # the workspace of each link code whose event carried none (taken without its link): where
    # the entry is filed for an erasure's sweep (``workers.consumer.pipeline``)
    owners: dict[str, str] = field(default_factory=dict)
    # stored in the transaction of another partition's batch, whose result counts its
    # events (workers.consumer.combine): this one's counts are all zero
    joined: bool = False


async def write_batch(
    pool: asyncpg.Pool,
    envelopes: list[Envelope],
    enricher: Enricher | None = None,
    effects: Effects = LIVE,
    fence: Sequence[str] = (),
) -> BatchResult:
    """Store a batch in one transaction; deadlocks and serialization failures retried.
    Refunds' copies follow, each in a transaction of its own (``workers.consumer.refunds``):
    after the batch, whose sales they may refund."""
    copies = [e for e in envelopes if e.type is EventType.REFUND]
    if copies:
        envelopes = [e for e in envelopes if e.type is not EventType.REFUND]
    result = (
        await _write_retried(pool, envelopes, enricher, effects, fence) if envelopes or not copies else BatchResult()
    )
    if copies:
        restored = await refunds.restore(pool, copies)
        result.inserted += restored.restored
        result.duplicates += restored.duplicates
        result.refunds_not_restored = restored.not_restored
    return result


async def _write_retried(
    pool: asyncpg.Pool, envelopes: list[Envelope], enricher: Enricher | None, effects: Effects, fence: Sequence[str]
) -> BatchResult:
    async def run() -> BatchResult:
        async with pool.acquire() as conn:
            # before the batch's transaction: an entry is made once, committed at once, and
            # held by no batch's lock (a batch rolled back leaves it, unnamed: no one's data)
            visitors, agents = rows.named(envelopes)
            known = await devices.ids(conn, enricher, visitors, agents=agents)
            async with conn.transaction():
                if fence:  # on a shard of several: no write of a workspace that moved away
                    await conn.execute(placement.FENCE_LOCK, fence)
                    check = placement.FENCE_NOT_HERE if effects.imported else placement.FENCE_MOVED
                    if moved := await conn.fetch(check, fence):
                        gone = [str(r["id"]) for r in moved]
                        raise placement.Moved(f"{len(gone)} workspace(s) moved to another shard", gone)
                result = await _write(conn, envelopes, enricher, effects, known)
            # committed, and nothing of it outlives its transaction (no session setting, lock,
            # cursor or LISTEN): the pool's reset would find nothing to undo
            skip_next_reset(conn)
            return result

    return await retried_in_place(run, "batch")


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch's state in its transaction, as ``_write``'s steps fill it in, in order."""

    conn: asyncpg.Connection
    enricher: Enricher | None
    effects: Effects
    known: devices.Known | None  # the devices and places made before the transaction
    result: BatchResult = field(default_factory=BatchResult)
    everything: list[Envelope] = field(default_factory=list)  # one per event id, sales too
    by_code: dict[str, LinkInfo] = field(default_factory=dict)
    # workspace id -> its row (ip_policy, bot_policy, fraud_policy, webhook_events)
    policies: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, object] = field(default_factory=dict)  # program id -> its fraud_thresholds as stored
    sold: list[Envelope] = field(default_factory=list)  # stored last (workers/consumer/sales.py)
    counting: set[str] = field(default_factory=set)  # workspaces whose bot_policy is "count"
    rows: list[EventRow] = field(default_factory=list)  # to insert, in event-id order
    claiming: list[EventRow] = field(default_factory=list)  # the rows before their keys' claim
    lost: list[UUID] = field(default_factory=list)  # events whose dedupe key was held already
    kept: dict[UUID, Stored] = field(default_factory=dict)
    no_row: list[drops.NoRow] = field(default_factory=list)  # dropped with no event row: counted once by event id
    policy: dict[str, Any] = field(default_factory=dict)  # workspace id -> its fraud_policy
    limits: dict[str, dict[str, int]] = field(default_factory=dict)  # program id -> its fraud thresholds
    burst: dict[UUID, bursts.Counted] = field(default_factory=dict)  # flagged in the transaction (excluded)
    later: list[UUID] = field(default_factory=list)  # clicks the click_burst rule judges after the commit
    returned: dict[UUID, bool] = field(default_factory=dict)  # inserted event id -> expired
    inserted: list[Stored] = field(default_factory=list)  # in event-id order
    flagged: fraud.Found = field(default_factory=fraud.Found)
    counted: list[Stored] = field(default_factory=list)
    unexpired: list[Stored] = field(default_factory=list)
    flags: list[tuple[Stored, str, bool]] = field(default_factory=list)
    alone: bool = False  # drops written in the counters' statement
    reached: list[counters.MilestoneReached] = field(default_factory=list)
    sold_out: sales.Settled = field(default_factory=sales.Settled)


async def _write(
    conn: asyncpg.Connection,
    envelopes: list[Envelope],
    enricher: Enricher | None,
    effects: Effects = LIVE,
    known: devices.Known | None = None,
) -> BatchResult:
    b = _Batch(conn, enricher, effects, known)
    ledger = await _read_links(b, envelopes)
    if ledger.erased:  # an erased person's events are stored scrubbed (ingest.contract.erasure)
        b.result.scrubbed = await erased.scrub(conn, ledger, b.everything, b.by_code)
    await _build_rows(b)
    if not b.kept:
        await _settle_rowless(b)
        return b.result
    await _claim_keys(b)
    await _bursts(b)
    await _insert(b)
    await _detect(b)
    await _count(b)
    if effects.counters_last:
        await _settle_drops(b)
        await _count_last(b)
    await _notify(b)
    if not effects.counters_last and not b.alone:
        await _settle_drops(b)
    return b.result


async def _read_links(b: _Batch, envelopes: list[Envelope]) -> erasure.Ledger:
    """The batch's events one per event id, the erasure ledger's entries for them, and the
    batch's links with their workspaces' policies and programs' thresholds."""
    # a requeued or spooled copy beside its original: one row per event id, the copy is a duplicate
    unique: dict[UUID, Envelope] = {}
    for e in envelopes:
        unique.setdefault(e.event_id, e)
    b.result.duplicates = len(envelopes) - len(unique)
    b.everything = list(unique.values())
    codes = sorted(
        {c for e in b.everything if e.type is not EventType.SALE and isinstance(c := e.payload.get("code"), str)}
    )
    # the ledger before anything else is read (the module's doc), and the batch's links in
    # the same statement: one round trip
    ledger, link_rows = await erasure.Ledger.read_with(
        b.conn, b.everything, then=erasure.Then(_RESOLVE_LINKS, (codes,))
    )
    for r in link_rows:
        info = b.by_code[r["code"]] = LinkInfo.from_record(r)
        b.policies[info.workspace_id] = r
        if info.program_id is not None:
            b.thresholds[info.program_id] = r["fraud_thresholds"]
    for e in b.everything:
        if e.workspace_id is None and isinstance(c := e.payload.get("code"), str) and c in b.by_code:
            b.result.owners[c] = b.by_code[c].workspace_id
    return ledger


async def _build_rows(b: _Batch) -> None:
    """The devices and places the rows name, then the rows (``rows``), in memory."""
    envelopes = [e for e in b.everything if e.type is not EventType.SALE]
    # the devices and places made before the transaction (``known``, for these envelopes as
    # they came), and any other made here (held until the commit): an erased person's click
    # is enriched without its User-Agent and address, so only a scrub can name one not made
    known = b.known
    if known is None or b.result.scrubbed:
        visitors, agents = rows.named(envelopes)
        known = await devices.ids(b.conn, b.enricher, visitors, known, agents=agents)
    b.sold = [e for e in b.everything if e.type is EventType.SALE]  # stored last (workers/consumer/sales.py)
    # bot_policy "count": a bot's click is a click too (still is_bot, still in bot_clicks).
    # Decided here, once per batch, and recorded on the row (bot_counted) for reconcile
    b.counting = {ws for ws, r in b.policies.items() if r["bot_policy"] == "count"}
    built = rows.build(envelopes, b.by_code, b.policies, b.enricher, known, b.counting)
    b.rows, b.kept, b.no_row = built.rows, built.kept, built.no_row
    b.result.unknown_codes, b.result.inactive_codes = built.unknown_codes, built.inactive_codes


async def _settle_rowless(b: _Batch) -> None:
    """A batch with no event row to store: its sales, their deliveries and the drops."""
    sold_out = await _sales(b.conn, b.sold, [], b.result, effects=b.effects)
    b.result.rowless = {n.event_id for n in [*b.no_row, *sold_out.drops]}
    if sold_out.notices and b.effects.webhooks:
        b.result.deliveries = await outbox.record_deliveries(b.conn, sold_out.notices)
    await drops.settle(b.conn, inserted=[], no_row=b.no_row + sold_out.drops, taken_back=sold_out.undrops)


async def _claim_keys(b: _Batch) -> None:
    """Statement one: the dedupe keys claimed (``dedupe.claim``), the rows left to insert."""
    b.claiming = b.rows
    b.rows, b.lost = await dedupe.claim(b.conn, b.rows)


async def _bursts(b: _Batch) -> None:
    """The workspaces' fraud policies and programs' thresholds; the click_burst rule: before
    the insert for the clicks of workspaces that exclude it (the flag decides what they
    count), after the commit for the others (``burst_pass``: named here, judged there)."""
    b.policy = {ws: r["fraud_policy"] or {} for ws, r in b.policies.items()}
    b.limits = fraud.thresholds_of(b.thresholds)
    if not b.effects.fraud:
        return
    now: list[Stored] = []
    for r in b.rows:
        if r.test_mode or r.type != EventType.CLICK or r.ip is None:
            continue
        if fraud.burst_excluded(b.policy, r.workspace_id):
            now.append(b.kept[r.event_id])
        else:
            b.later.append(r.event_id)
    if now:
        b.burst = await fraud.bursts_before_insert(b.conn, now, b.limits)


async def _insert(b: _Batch) -> None:
    """Statement two: the events' rows; then what the events that lost their key's claim
    are (``dedupe.settle_lost``)."""
    doc = jsonrows.doc(event_row.plain(b.rows))
    inserted = await (
        b.conn.fetch(_INSERT_EVENTS_PENDING, doc, b.later) if b.later else b.conn.fetch(_INSERT_EVENTS, doc)
    )
    b.returned = {r["event_id"]: r["expired"] for r in inserted}
    b.inserted = [s for event_id, s in b.kept.items() if event_id in b.returned]  # in event-id order
    b.result.inserted = len(b.inserted)
    b.result.duplicates += len(b.kept) - len(b.inserted)
    b.result.copies = set(b.kept) - set(b.returned)
    b.no_row += await dedupe.settle_lost(b.conn, b.claiming, b.lost, b.kept)
    b.result.expired = sum(b.returned.values())


async def _detect(b: _Batch) -> None:
    """The fraud rules over the live events; what is counted, and the drops and flags."""
    # test-mode, out-of-window and expired events are stored, and that is all: no counter,
    # no customer, no attribution, no webhook
    live = [
        s
        for s in b.inserted
        if s.envelope.payload.get("test_mode") is not True
        and not s.out_of_window
        and not b.returned[s.envelope.event_id]
    ]
    b.flagged = await fraud.detect(b.conn, live, b.policy, b.limits, b.burst) if b.effects.fraud else fraud.Found()
    b.counted = b.flagged.counted(live)  # a flag the workspace excludes: stored and flagged, nothing more
    b.unexpired = [
        s for s in b.inserted if not b.returned[s.envelope.event_id]
    ]  # an expired event drops nothing either
    b.flags = [(f.stored, f.rule, f.excluded) for f in b.flagged.flags]
    # a batch that locks no row after its counters (only clicks, none making a customer; no
    # sale; no drop without a row to record) writes its drops in the counters' statement,
    # as the last rows it locks still: a round trip fewer
    b.alone = (
        bool(b.counted)
        and not b.effects.counters_last
        and not b.sold
        and not b.no_row
        and all(s.type is EventType.CLICK and not customers.makes_one(s) for s in b.counted)
    )


async def _count(b: _Batch) -> None:
    """The counters (unless last: ``Effects.counters_last``), customers, then the sales."""
    if b.counted and not b.effects.counters_last:
        dropped = drops.tally(b.unexpired, b.counting, b.flags) if b.alone else None
        b.reached = await counters.apply(b.conn, b.counted, count_bots=b.counting, dropped=dropped)
    if b.counted:
        await customers.upsert(b.conn, b.counted)
    leads = [s for s in b.counted if s.type is EventType.LEAD]
    b.sold_out = await _sales(b.conn, b.sold, leads, b.result, b.counted, b.effects)
    b.result.rowless = {n.event_id for n in [*b.no_row, *b.sold_out.drops]}


async def _count_last(b: _Batch) -> None:
    """An import's counters, moved last (``Effects.counters_last``): after its drops."""
    if b.counted:
        b.reached = await counters.apply(b.conn, b.counted, count_bots=b.counting)


async def _settle_drops(b: _Batch) -> None:
    """The batch's drops and flags (``drops.settle``): the last rows it locks, but for an
    import's counters (``Effects.counters_last``)."""
    await drops.settle(
        b.conn,
        inserted=b.unexpired,
        no_row=b.no_row + b.sold_out.drops,
        counting=b.counting,
        flags=b.flags,
        taken_back=b.sold_out.undrops,
    )


async def _notify(b: _Batch) -> None:
    """The batch's webhook deliveries, recorded in the outbox."""
    # the notices of the batch's links, only where their workspace has a webhook for them:
    # most have none, and a notice is a document per event (the outbox's insert joins the
    # webhooks again, at its own snapshot)
    heard = {(ws, t) for ws, r in b.policies.items() for t in r["webhook_events"]}
    told = [s for s in b.counted if (s.link.workspace_id, notices.TYPE_OF.get(s.type)) in heard]
    events = notices.for_events(told) if told else []
    if b.reached and any(t == "milestone.reached" for _, t in heard):
        events += await notices.for_milestones(b.conn, b.counted, b.reached)
    b.result.milestones = len(b.reached)
    events += fraud.notices(b.flagged, lambda ws: (ws, "fraud.flagged") in heard) + b.sold_out.notices
    if events and b.effects.webhooks:
        b.result.deliveries = await outbox.record_deliveries(b.conn, events)


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
