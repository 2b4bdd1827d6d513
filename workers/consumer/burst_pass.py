"""The click_burst rule after the batch's commit: a pass over committed clicks, set-based.

A flag is a flag, not a count: it moves no counter, so it needs no place in the batch's
transaction (where it cost Postgres about a third of a stored click: docs/benchmarks.md,
"The click_burst rule after the commit"). A workspace that excludes the rule is the
exception, judged in the batch (``workers.consumer.fraud.burst_excluded``).

- **What is left to judge is durable.** The batch's events insert writes one
  ``burst_pending`` row (its clicks' event ids) in its transaction (``workers.consumer.store``):
  the commit that stores a click also leaves it to judge, and a worker that stops after
  the commit leaves the row to the next pass of any worker.
- **A pass is one transaction, bounded.** It takes at most ``PASS_ROWS`` pending rows
  (``FOR UPDATE SKIP LOCKED``: workers share them; oldest first, so that clicks are merged
  in about the order they were stored), reads their clicks from ``events`` as committed
  (an erased click, its address gone, is not judged; a row since dropped with its partition
  neither), merges them into their windows and counts them in one statement
  (``workers.consumer.bursts``), writes the flags, their ``drop_stats`` count
  (``flagged``/``click_burst``) and their ``fraud.flagged`` deliveries, and deletes the
  rows it took. A pass that fails rolls all of it back; the rows are taken again.
- **Flags, compact.** A pass writes its flags as one ``burst_flags`` row per link and day
  (schema 25): their event ids in an array, in id order, and the link's thresholds when
  judged, which are every one of its flags' evidence (a flagged click's count stops at
  the threshold + 1). About 16 bytes a flagged click, where an ``event_flags`` row and its
  key took about 200 (docs/benchmarks.md, "A pass's flags as one row per link").
- **Idempotent by event id.** An id enters ``burst_pending`` once, with the insert that
  stored it, and leaves it in the transaction that writes its flag; and a pass writes
  only the ids no ``burst_flags`` row of their link holds already (the rows whose range of
  ids overlaps the pass's for the link, found in ``burst_flags_link`` alone: a pass of
  fresh clicks reads one row or none; one of late clicks no more than their span's),
  so a click judged twice (a pass repeated, a replay) flags nothing twice and is counted
  and announced once; a window holds a click once, by event id.
- **Lock order**: ``burst_pending``, then the batch's own order (``workers.consumer.store``):
  burst_windows, burst_flags (where ``event_flags`` is), links, webhook_deliveries,
  drop_stats, each in key order. The
  flagged clicks' links are locked as a batch locks them (FOR NO KEY UPDATE), so that a
  fixing reconcile, which holds its chunk's links while it recounts ``drop_stats``
  (``workers.ops.reconcile``), never rewrites a count beside a flag not yet committed.

The consumer runs a pass every ``PASS_EVERY_S`` (``workers.consumer.consume``), and again
at once while a pass took all it may: docs/guarantees.md says how soon a flag appears.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import structlog

from ingest.contract import jsonrows
from ingest.contract.drops import FLAGGED
from ingest.contract.fraud import FRAUD_THRESHOLDS
from ingest.ledger import outbox
from workers.consumer import bursts, drops, fraud
from workers.group.errors import retried_in_place

log = structlog.get_logger("workers.burst_pass")

# A pass holds the worker's loop for its Python between its statements, and takes Postgres's
# CPU from the batches beside it: 32 rows a second held it up to about 50 ms each second at
# (e)'s half load, where the slowest 1 % of events were stored (docs/benchmarks.md, "The
# click_burst pass, smaller and four times a second"). A quarter of that, four times as often.
PASS_ROWS: Final = 8  # pending rows (a batch's clicks each) a pass takes: its bound
PASS_EVERY_S: Final = 0.25  # how often the consumer passes
PASSES_A_TICK: Final = 32  # passes in a row at most, while each takes all it may (a backlog)
DRAIN_PASSES: Final = 4_000  # passes at most at the end of `work --drain` (32,000 batches' clicks)

_TAKE = """
DELETE FROM burst_pending WHERE id IN (
    SELECT id FROM burst_pending ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING clicks
"""
# the clicks as committed, with what their flags and notices need: thresholds (the
# program's now), the link's code
_CLICKS = """
SELECT e.event_id, e.workspace_id::text, e.link_id::text, host(e.ip) AS ip, e.is_bot, e.received_at,
       (extract(epoch FROM e.received_at) * 1000)::bigint AS at_ms, e.program_id::text, e.affiliate_id::text,
       l.code, p.fraud_thresholds
FROM events e
LEFT JOIN links l ON l.id = e.link_id
LEFT JOIN programs p ON p.id = e.program_id
WHERE e.event_id = ANY ($1::uuid[]) AND e.type = 1 AND e.ip IS NOT NULL AND e.link_id IS NOT NULL
"""
# the workspaces of a pass's new flags a webhook hears fraud.flagged in: once a workspace,
# not once a click
_HEARD = """
SELECT DISTINCT workspace_id::text FROM webhooks
WHERE workspace_id = ANY ($1::uuid[]) AND active AND 'fraud.flagged' = ANY (events)
"""
_LINKS = "SELECT 1 FROM links WHERE id = ANY ($1::uuid[]) ORDER BY id FOR NO KEY UPDATE"
# the ids of the rows of each link ($1) whose range overlaps the pass's ids of it ($2 to
# $3): found in the index (its first id beside its last), only those rows read
_FLAGGED = """
SELECT i FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS q (link_id, low, high)
JOIN burst_flags b ON b.link_id = q.link_id AND b.last_id >= q.low AND b.first_id <= q.high
CROSS JOIN LATERAL unnest(b.ids) AS i
"""
_FLAGS = """
INSERT INTO burst_flags (last_id, first_id, workspace_id, link_id, clicks, seconds, ids)
SELECT (r->>0)::uuid, (r->>1)::uuid, (r->>2)::uuid, (r->>3)::uuid, (r->>4)::integer, (r->>5)::integer,
       ARRAY(SELECT x::uuid FROM jsonb_array_elements_text(r->6) AS x)
FROM jsonb_array_elements($1::text::jsonb) AS r
ORDER BY 1
"""
ROW_IDS: Final = 480  # ids a burst_flags row holds at most: 16 bytes each, the row in its page


@dataclass(slots=True)
class Passed:
    taken: int = 0  # pending rows judged
    judged: int = 0  # their clicks read (with an address, still stored)
    flagged: int = 0  # flags new to this pass
    deliveries: list[str] = field(default_factory=list)  # fraud.flagged outbox rows to enqueue


async def run(pool: asyncpg.Pool, rows: int = PASS_ROWS) -> Passed:
    """One pass over at most ``rows`` pending rows, in one transaction; deadlocks and
    serialization failures retried. The deliveries it made are for the caller to enqueue
    after it (the webhooks' sweep enqueues what is left)."""

    async def once() -> Passed:
        async with pool.acquire() as conn, conn.transaction():
            return await _pass(conn, rows)

    return await retried_in_place(once, "burst_pass")


async def _pass(conn: asyncpg.Connection, rows: int) -> Passed:
    taken = await conn.fetch(_TAKE, rows)
    out = Passed(taken=len(taken))
    ids = sorted({i for r in taken for i in r["clicks"]})
    if not ids:
        return out
    found = await conn.fetch(_CLICKS, ids)
    out.judged = len(found)
    # each link's and program's thresholds once (an unusable one warned of once a pass, not a click)
    links = {r["link_id"]: r for r in found}.values()
    programs = fraud.thresholds_of({r["program_id"]: r["fraud_thresholds"] for r in links if r["program_id"]})
    limits = {r["link_id"]: fraud.burst_limits(programs.get(r["program_id"], FRAUD_THRESHOLDS)) for r in links}
    clicks = [bursts.Click(r["event_id"], r["link_id"], r["ip"], r["at_ms"], not r["is_bot"]) for r in found]
    crossed = [c for c in await bursts.count(conn, clicks, limits) if c.clicks > c.limits.clicks]
    if not crossed:
        return out
    by_id = {r["event_id"]: r for r in found}
    new = await _flag(conn, crossed, by_id)
    out.flagged = len(new)
    hearing = await _hearing(conn, {by_id[i]["workspace_id"] for i in new})  # a read: before the links' locks
    if new:
        await conn.execute(_LINKS, sorted({by_id[i]["link_id"] for i in new}))
    heard = {c.click.event_id: c for c in crossed if by_id[c.click.event_id]["workspace_id"] in hearing}
    notices = [fraud.notice(*_notice(by_id[i], _evidence(heard[i]))) for i in new if i in heard]
    out.deliveries = await outbox.record_deliveries(conn, notices)
    counts: Counter[drops.Key] = Counter()
    for i in new:
        r = by_id[i]
        counts[(r["workspace_id"], r["link_id"], r["received_at"].date(), FLAGGED, "click_burst")] += 1
    await drops.add(conn, counts)
    return out


async def _hearing(conn: asyncpg.Connection, workspaces: set[str]) -> set[str]:
    """Those of ``workspaces`` a webhook hears fraud.flagged in."""
    if not workspaces:
        return set()
    return {r[0] for r in await conn.fetch(_HEARD, sorted(workspaces))}


async def _flag(conn: asyncpg.Connection, crossed: list[bursts.Counted], by_id: dict[Any, asyncpg.Record]) -> list[Any]:
    """The flags of ``crossed`` no row holds already, written as ``burst_flags`` rows (per
    link and day, ``ROW_IDS`` ids at most); their ids, in order."""
    span: dict[str, tuple[Any, Any]] = {}
    for c in crossed:
        link, i = c.click.link_id, c.click.event_id
        low, high = span.get(link, (i, i))
        span[link] = (min(low, i), max(high, i))
    links = sorted(span)
    ranges = [span[k] for k in links]
    held = {r["i"] for r in await conn.fetch(_FLAGGED, links, [lo for lo, _ in ranges], [hi for _, hi in ranges])}
    rows: dict[tuple[str, Any, int, int], list[Any]] = {}
    for c in sorted(crossed, key=lambda c: c.click.event_id):
        i = c.click.event_id
        if i in held:
            continue
        held.add(i)  # once, were a pass to hand it twice
        key = (c.click.link_id, by_id[i]["received_at"].date(), c.limits.clicks, c.limits.seconds)
        rows.setdefault(key, []).append(i)
    docs = []
    for (link, _day, clicks, seconds), flagged in sorted(rows.items()):
        workspace = by_id[flagged[0]]["workspace_id"]
        for at in range(0, len(flagged), ROW_IDS):
            chunk = flagged[at : at + ROW_IDS]
            docs.append((chunk[-1], chunk[0], workspace, link, clicks, seconds, chunk))
    if docs:
        await conn.execute(_FLAGS, jsonrows.doc(docs))
    return sorted(i for *_, chunk in docs for i in chunk)


def _evidence(c: bursts.Counted) -> dict[str, Any]:
    """A click_burst flag's evidence, as its notice has it beside the address (which is its
    click's row's, ``fraud.ON_THE_ROW``, and which an erasure scrubs there); a
    ``burst_flags`` row keeps the thresholds, the count being the threshold + 1."""
    return {"clicks": c.clicks, "threshold_clicks": c.limits.clicks, "window_seconds": c.limits.seconds}


def _notice(r: asyncpg.Record, evidence: dict[str, Any]) -> tuple[Any, ...]:
    """``fraud.notice``'s arguments for a flagged click: its evidence with its address,
    as the batch's notices have it."""
    link = {"id": r["link_id"], "code": r["code"], "program_id": r["program_id"], "affiliate_id": r["affiliate_id"]}
    return (
        r["workspace_id"],
        r["event_id"],
        "click",
        r["received_at"],
        link,
        [("click_burst", {"ip": r["ip"], **evidence}, False)],
    )


async def run_until_done(pool: asyncpg.Pool, passes: int = PASSES_A_TICK) -> list[Passed]:
    """Passes while each takes all it may, ``passes`` at most: a tick's work."""
    done = []
    for _ in range(passes):
        done.append(await run(pool))
        if done[-1].taken < PASS_ROWS:
            break
    return done
