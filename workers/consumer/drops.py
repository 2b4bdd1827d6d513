"""Why events did not count, in ``drop_stats``: per workspace, link, UTC day, reason.

Two paths in, both exactly once:

- the worker's own decisions, in the batch transaction. A drop with an event row (a bot
  not counted, test mode, out of window, excluded by fraud policy) is counted from the
  rows the insert returned, like every counter; a drop with no row (an unknown code, an
  inactive link, a second lead or conversion under one dedupe key) is recorded in
  ``event_drops`` by event id with ON CONFLICT DO NOTHING RETURNING, and counted from
  what came back: a redelivery counts nothing.
- the edge's refusals, tallied into one Redis hash (``ingest.contract.drops``). ``fold`` renames
  the hash to a fold key named once and for all (a script: rename and remember, on one
  hash tag), adds the fold into Postgres in a transaction that also records the fold key
  in ``drop_folds``, then deletes it. A crash anywhere repeats at most the steps after:
  the record makes a second addition a no-op.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import jsonrows, link_keys
from ingest.contract.drops import FLAGGED, NO_ID, fold_key, folds_key, live_key, parse_field
from ingest.contract.events import EventType
from ingest.contract.replicated import Replicated
from ingest.ledger.placement import Placement
from workers.consumer.stored import Stored

log = structlog.get_logger("workers.drops")

Key = tuple[str, str, date, str, str]  # workspace, link, day, reason, detail

_DROP_COUNTS = ("uuid", "uuid", "date", "text", "text", "bigint"), "d(workspace_id, link_id, day, reason, detail, n)"


def add_rows(*, source: str, param: int, gate: str = "") -> str:
    """The upsert of drop counts into ``drop_stats``: the counts as ``$param`` (a JSON
    document of ``(workspace, link, day, reason, detail, n)`` rows), ``source`` an SQL
    expression, ``gate`` a condition on the rows (``workers.consumer.counters``' order)."""
    return f"""
INSERT INTO drop_stats AS s (workspace_id, link_id, day, reason, detail, source, n)
SELECT d.workspace_id, d.link_id, d.day, d.reason, d.detail, {source}, d.n
FROM {jsonrows.table(*_DROP_COUNTS, param=param)}{gate}
ORDER BY 1, 2, 3, 4, 5
ON CONFLICT (workspace_id, link_id, day, reason, detail, source) DO UPDATE SET n = s.n + EXCLUDED.n
"""


_ADD = add_rows(source="$2::text", param=1)

_RECORD = f"""
INSERT INTO event_drops (event_id, workspace_id, link_id, reason, received_at)
{jsonrows.select(("uuid", "uuid", "uuid", "text", "timestamptz"))} ORDER BY 1
ON CONFLICT DO NOTHING
RETURNING event_id
"""

# rename the live hash to a fold key (named by the caller, never reused) and remember it;
# then every fold not yet finished. One hash tag: the same on a Redis Cluster
_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('SADD', KEYS[3], KEYS[2])
end
return redis.call('SMEMBERS', KEYS[3])
"""


@dataclass(frozen=True, slots=True)
class NoRow:
    """A drop the worker decided with no event row to show for it."""

    event_id: uuid.UUID
    workspace_id: str | None
    link_id: str | None
    reason: str
    at: datetime


async def add(conn: asyncpg.Connection, counts: Counter[Key], source: str = "worker") -> None:
    if not counts:
        return
    await conn.execute(_ADD, jsonrows.doc([(*k, counts[k]) for k in sorted(counts)]), source)


async def record(conn: asyncpg.Connection, rows: list[NoRow], counts: Counter[Key]) -> None:
    """Record drops without an event row; those newly recorded are added to ``counts``."""
    if not rows:
        return
    rows = sorted({r.event_id: r for r in rows}.values(), key=lambda r: r.event_id)
    new = {
        r["event_id"]
        for r in await conn.fetch(
            _RECORD,
            jsonrows.doc([(r.event_id, r.workspace_id or NO_ID, r.link_id or NO_ID, r.reason, r.at) for r in rows]),
        )
    }
    for r in rows:
        if r.event_id in new:
            counts[(r.workspace_id or NO_ID, r.link_id or NO_ID, r.at.date(), r.reason, "")] += 1


def reason(s: Stored, counting: Collection[str], excluded: dict[uuid.UUID, str]) -> tuple[str, str] | None:
    """Why a newly stored event moves no counter (reason, detail), or None if it counts."""
    if s.envelope.payload.get("test_mode") is True:
        return "test_mode", ""
    if s.out_of_window:
        return "out_of_window", ""
    if s.type is EventType.CLICK and s.is_bot and s.link.workspace_id not in counting:
        return "bot", s.bot_reason or ""
    if (rule := excluded.get(s.envelope.event_id)) is not None:
        return "fraud", rule
    return None


_TAKE_BACK = f"""
DELETE FROM event_drops d
USING {jsonrows.table(("uuid", "text"), "x(event_id, reason)")}
WHERE d.event_id = x.event_id AND d.reason = x.reason
RETURNING d.event_id, d.workspace_id, d.link_id, d.reason, d.received_at
"""


async def take_back(conn: asyncpg.Connection, rows: list[NoRow], counts: Counter[Key]) -> None:
    """Drops recorded without an event row that no longer hold (a sale its lead, stored
    after it, attributes): removed, and their counts taken back."""
    if not rows:
        return
    rows = sorted({r.event_id: r for r in rows}.values(), key=lambda r: r.event_id)
    for r in await conn.fetch(_TAKE_BACK, jsonrows.doc([(r.event_id, r.reason) for r in rows])):
        counts[(str(r["workspace_id"]), str(r["link_id"]), r["received_at"].date(), r["reason"], "")] -= 1


async def settle(
    conn: asyncpg.Connection,
    *,
    inserted: list[Stored],
    no_row: list[NoRow],
    counting: Collection[str] = (),
    flags: Collection[tuple[Stored, str, bool]] = (),
    taken_back: list[NoRow] | None = None,
) -> None:
    """A batch's drops and flags into ``drop_stats``, in its transaction (last: key order)."""
    counts: Counter[Key] = Counter()
    await record(conn, no_row, counts)
    await take_back(conn, taken_back or [], counts)
    counts.update(tally(inserted, counting, flags))
    await add(conn, counts)


async def _by_shard(pool: asyncpg.Pool | Placement, counts: Counter[Key]) -> dict[asyncpg.Pool, Counter[Key]]:
    if not isinstance(pool, Placement):
        return {pool: counts}
    parts: dict[asyncpg.Pool, Counter[Key]] = {}
    for k, n in counts.items():
        parts.setdefault(await pool.pool(k[0]), Counter())[k] = n
    return parts or {pool.directory: counts}


def tally(
    inserted: list[Stored], counting: Collection[str] = (), flags: Collection[tuple[Stored, str, bool]] = ()
) -> Counter[Key]:
    """The drops and flags of a batch's newly inserted events (those with an event row)."""
    counts: Counter[Key] = Counter()
    excluded: dict[uuid.UUID, str] = {}
    for s, rule, was_excluded in sorted(flags, key=lambda f: f[1]):
        counts[(s.link.workspace_id, s.link.id, s.at.date(), FLAGGED, rule)] += 1
        if was_excluded:
            excluded.setdefault(s.envelope.event_id, rule)
    for s in inserted:
        if (why := reason(s, counting, excluded)) is not None:
            counts[(s.link.workspace_id, s.link.id, s.at.date(), *why)] += 1
    return counts


async def fold(redis: Any, pool: asyncpg.Pool | Placement, prefix: str, replicated: Replicated | None = None) -> int:
    """Fold the edges' tallies into ``drop_stats`` (each workspace's on its shard, when
    ``pool`` is the placement); the number of events added. ``replicated``: at
    ``REFSTREAM_ACK_DURABILITY=replicas:N`` the rename reaches N replicas before Postgres adds
    what it took (``ingest.contract.replicated``), else a failover between the two brought the
    live hash back unrenamed, and its next fold added it again."""
    token = uuid.uuid4().hex
    take = ("EVAL", _TAKE, 3, live_key(prefix), fold_key(prefix, token), folds_key(prefix))
    (pending,) = await (replicated or Replicated(redis, 0, 0)).send([take])
    total = 0
    for raw in sorted(pending):
        key = raw.decode() if isinstance(raw, bytes) else raw
        tally = await redis.hgetall(key)
        counts: Counter[Key] = Counter()
        for f, n in tally.items():
            parsed = parse_field(f)
            if parsed is None:
                log.warning("drops.bad_field", field=repr(f)[:200])
                continue
            day, ws, link, reason, detail = parsed
            try:
                counts[(str(uuid.UUID(ws)), str(uuid.UUID(link)), date.fromisoformat(day), reason, detail)] += int(n)
            except ValueError:
                log.warning("drops.bad_field", field=repr(f)[:200])
        for shard, part in (await _by_shard(pool, counts)).items():
            async with shard.acquire() as conn, conn.transaction():
                first = await conn.fetchval(
                    "INSERT INTO drop_folds (fold_key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", key
                )
                if first:  # else folded already (on this shard), before a crash kept us from deleting it
                    await add(conn, part, "edge")
                    total += sum(part.values())
        await redis.delete(key)
        await redis.srem(folds_key(prefix), key)
    if pending:
        # a fold key is never named twice, and its deletion follows its record within one
        # fold: records older than a week guard nothing
        for shard in (await pool.pools()).values() if isinstance(pool, Placement) else [pool]:
            await shard.execute("DELETE FROM drop_folds WHERE folded_at < now() - interval '7 days'")
    return total


# ---------------------------------------------------------------------------------------
# The recount, for ``refstream reconcile`` (``workers.ops.reconcile``): the worker's drops
# and flags, recounted from the rows for one chunk of links in the reconcile's window, in
# its transaction. What a batch decided is on its rows: test mode, out-of-window and
# ``bot_counted`` on the event, a fraud flag in ``event_flags`` (read through its event: the
# flag holds no link or time of its own since schema 17; a click_burst flag there too since
# schema 23, written after the batch's commit with its count: ``burst_pass``), a click_burst
# flag the workspace did not exclude in a ``burst_flags`` row since schema 25 (read from the
# rows of the chunk's links not older than the window's oldest event) or, in schemas 18 to
# 22, on the event's row (``burst_clicks``), a drop without
# an event (an unknown code, an inactive link, a duplicate) in ``event_drops``. The edge's
# refusals (``source = 'edge'``) have no row to recount them from: they are left as they
# are. Drops that no link resolved for are counted under the nil link id, a chunk of their
# own (``NO_LINK``).

NO_LINK = UUID(int=0)

# $1 link ids, $2/$3 the window [from, to), $4 the horizon's event id
_TRUTH = f"""
CREATE TEMP TABLE reconcile_drops ON COMMIT DROP AS
SELECT workspace_id, link_id, day, reason, detail, count(*)::bigint AS n FROM (
    SELECT e.workspace_id, e.link_id, (e.received_at AT TIME ZONE 'UTC')::date AS day,
           CASE WHEN e.test_mode THEN 'test_mode'
                WHEN e.out_of_window THEN 'out_of_window'
                WHEN e.type = 1 AND e.is_bot AND NOT e.bot_counted THEN 'bot'
                WHEN x.rule IS NOT NULL THEN 'fraud' END AS reason,
           CASE WHEN e.test_mode OR e.out_of_window THEN ''
                WHEN e.type = 1 AND e.is_bot AND NOT e.bot_counted THEN coalesce(e.enrichment->>'bot_reason', '')
                ELSE coalesce(x.rule, '') END AS detail
    FROM events e
    LEFT JOIN LATERAL (SELECT min(f.rule) AS rule FROM event_flags f
                       WHERE f.event_id = e.event_id AND f.excluded) x ON true
    WHERE {link_keys.of_links("e.link_id", "$1")} AND e.received_at >= $2 AND e.received_at < $3 AND e.event_id >= $4
) t WHERE reason IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
UNION ALL
SELECT workspace_id, link_id, (received_at AT TIME ZONE 'UTC')::date, reason, '', count(*)
FROM event_drops
WHERE link_id = ANY($1::uuid[]) AND received_at >= $2 AND received_at < $3 AND event_id >= $4
GROUP BY 1, 2, 3, 4
UNION ALL
SELECT workspace_id, link_id, day, 'flagged', rule, count(*) FROM (
    SELECT e.workspace_id, e.link_id, (e.received_at AT TIME ZONE 'UTC')::date AS day, f.rule
    FROM events e JOIN event_flags f ON f.event_id = e.event_id
    WHERE {link_keys.of_links("e.link_id", "$1")} AND e.received_at >= $2 AND e.received_at < $3 AND e.event_id >= $4
    UNION ALL
    SELECT e.workspace_id, e.link_id, (e.received_at AT TIME ZONE 'UTC')::date, 'click_burst'
    FROM events e
    WHERE {link_keys.of_links("e.link_id", "$1")} AND e.received_at >= $2 AND e.received_at < $3 AND e.event_id >= $4
      AND e.burst_clicks IS NOT NULL
    UNION ALL
    SELECT e.workspace_id, e.link_id, (e.received_at AT TIME ZONE 'UTC')::date, 'click_burst'
    FROM burst_flags b CROSS JOIN LATERAL unnest(b.ids) AS i (id) JOIN events e ON e.event_id = i.id
    WHERE b.link_id = ANY($1::uuid[]) AND b.last_id >= greatest($4, coalesce(
            (SELECT min(w.event_id::text)::uuid FROM events w
             WHERE {link_keys.of_links("w.link_id", "$1")} AND w.received_at >= $2 AND w.received_at < $3),
            'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
      AND e.received_at >= $2 AND e.received_at < $3 AND e.event_id >= $4
) flags
GROUP BY 1, 2, 3, 5
"""

# $1 link ids, $2/$3 the window's days [from, to)
_STORED = """
SELECT * FROM drop_stats WHERE source = 'worker' AND link_id = ANY($1::uuid[]) AND day >= $2 AND day < $3
"""
_DRIFT = f"""
SELECT coalesce(l.code, '(no link)') AS code, coalesce(s.day, r.day) AS day,
       coalesce(s.reason, r.reason) AS reason, coalesce(s.detail, r.detail) AS detail,
       coalesce(s.n, 0) AS stored, coalesce(r.n, 0) AS recomputed
FROM ({_STORED}) s
FULL JOIN reconcile_drops r USING (workspace_id, link_id, day, reason, detail)
LEFT JOIN links l ON l.id = coalesce(s.link_id, r.link_id)
WHERE coalesce(s.n, 0) <> coalesce(r.n, 0)
ORDER BY 1, 2, 3, 4
"""

_FIX = (
    """
    DELETE FROM drop_stats s
    WHERE s.source = 'worker' AND s.link_id = ANY($1::uuid[]) AND s.day >= $2 AND s.day < $3 AND NOT EXISTS (
        SELECT 1 FROM reconcile_drops r WHERE (r.workspace_id, r.link_id, r.day, r.reason, r.detail)
                                            = (s.workspace_id, s.link_id, s.day, s.reason, s.detail))
    """,
    """
    INSERT INTO drop_stats AS s (workspace_id, link_id, day, reason, detail, source, n)
    SELECT workspace_id, link_id, day, reason, detail, 'worker', n FROM reconcile_drops ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (workspace_id, link_id, day, reason, detail, source) DO UPDATE SET n = EXCLUDED.n
    WHERE s.n <> EXCLUDED.n
    """,
)


async def drift(
    conn: asyncpg.Connection,
    ids: list[UUID],
    edges: tuple[Any, Any],
    days: tuple[Any, Any],
    horizon_id: UUID,
    *,
    fix: bool,
) -> list[dict[str, Any]]:
    """In the caller's transaction: each (link, day, reason, detail) of the links ``ids``
    in the window (``edges``: timestamps; ``days``: the same as dates) whose worker count
    differs from its rows, found before any repair."""
    await conn.execute(_TRUTH, ids, *edges, horizon_id)
    rows = [dict(r) for r in await conn.fetch(_DRIFT, ids, *days)]
    if fix and rows:
        await conn.execute(_FIX[0], ids, *days)
        await conn.execute(_FIX[1])
    return rows
