"""An erasure outside Postgres: Redis and the archive (``ingest.privacy.erasure`` does Postgres).

``sweep`` runs in the workers (an arq cron) and from ``refstream erase``; it finishes
every erasure the ledger holds as pending, all of them in one pass over each place:

- Postgres, again, behind the ledger's fence (``ingest.privacy.erasure_late.recheck``): an event
  row whose visitor, click or customer the ledger names and that still holds personal data
  (a batch stored it beside the one whose late lead taught the ledger that visitor).

- Redis, for the erasures it is pending for, and only what their people own there: what
  the ledger's entries and the people's rows name (``ingest.contract.erasure_index``), never
  a scan of every key or a read of every stream, so a sweep costs what the erased own, not
  what Redis holds. Their stream entries (each stored event's, read from its time in its
  stream; those the workers filed under one of their digests, appended late or stored as no
  row): one every consumer group has read and acked is deleted (XDEL: what a trim would do
  later); one a group has yet to read or ack is left to it (the workers store it scrubbed)
  and found again by the next sweep, and so is a partition whose workers have yet to read
  what was appended before the erasure. A dead letter of theirs is replaced by its scrubbed
  copy (the letters read once for each state of the pending erasures, then only those
  written since). The idempotency answers of their events (found by the index the edge
  files each record in) are rewritten in place, keeping their status and fingerprint, so a
  client's retry still gets its answer and appends nothing; the fingerprint cache's entries
  of their visitors (filed under each visitor's digest) are deleted.
- The archive, once Redis holds none of their unread entries: every segment from the hour
  of the person's first event on that holds one of their entries is rewritten, under the
  same name (same ids, same count, a new checksum), with the entries scrubbed. (A segment
  uploaded after the erasure was scrubbed by its archiver: ``workers.archive.erased``.)

What a copy the sweep scrubs teaches the ledger (a dead-lettered lead's click) is learned
as a worker would learn it, and the erasure is pending again. A place is marked done only
if nothing made the erasure pending again while the sweep ran (``erasures.generation``):
a worker that met a late copy of the person meanwhile has its copies found by the next.

Each erasure records the time each place was done (``erasures.redis_at``, ``archive_at``);
``status`` lists what is pending, and an archive past its ``archive_due`` is overdue.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from ingest.contract import erasure, layout
from ingest.contract.connections import Redis
from ingest.contract.keys import Keys
from ingest.contract.wire import FIELD
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_copy, erasure_late
from workers.archive import erased
from workers.archive import read as archive_read
from workers.archive import segment as seg
from workers.archive.store import Store
from workers.ops import erasure_letters, erasure_reach, erasure_redis
from workers.ops.erasure_fence import Fence
from workers.ops.erasure_reach import Check, SweepResult

log = structlog.get_logger("workers.erasure")

_PAGE = 1000
# a moved-away workspace's old copy (``workspaces.moved_to``) is frozen until dropped: its
# erasures are the ones on the shard it is on now, listed and swept there
_PENDING = (
    pg_erasure.ROW
    + " WHERE archive_at IS NULL AND NOT EXISTS (SELECT 1 FROM workspaces w"
    + " WHERE w.id = erasures.workspace_id AND w.moved_to IS NOT NULL) ORDER BY requested_at"
)


async def status(pg: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every erasure with a place still pending, oldest first: ``refstream erase --status``."""
    return [pg_erasure.describe(r) for r in await pg.fetch(_PENDING)]


async def sweep(
    pg: asyncpg.Pool,
    redis: Redis,
    keys: Keys,
    store: Store | None,
    *,
    replicas: int = 0,
    wait_ms: int = 500,
    shard: str = "default",
) -> SweepResult:
    """One pass over Redis, and where Redis is clear, over the archive (the module's doc).
    ``store`` None: no archive is configured, and there is none to rewrite. ``replicas``
    (``REFSTREAM_ACK_DURABILITY=replicas:N``): Redis is marked done only once N replicas
    hold what the pass deleted and rewrote there, on the servers it began on
    (``workers.ops.erasure_fence``). ``shard``: the name of ``pg``'s shard, whose own
    place in the dead letters each sweep there goes on from."""
    result = SweepResult()
    rows = await pg.fetch(_PENDING)
    rows = [r for r in rows if r["postgres_at"] is not None]  # the ledger and Postgres first
    result.erasures = len(rows)
    if not rows:
        return result
    async with pg.acquire() as conn:
        key = await erasure.salt(conn)
    high = await _high(redis, keys)
    fence = Fence(redis, keys, high, replicas, wait_ms)
    await fence.begin()  # before its first write: a failover during the sweep is seen at its end
    # the ledger's copy outside Postgres, as it stands now (what writers taught it since):
    # before Redis can be marked done, and before the fence that replicates it
    await erasure_copy.keep(pg, redis, keys, [r["id"] for r in rows])
    check = Check(pg, key)
    since = [r["since"] for r in rows if r["since"] is not None]
    # Postgres first: a row a batch stored beside the one that taught the ledger its visitor
    result.rows_rechecked = await _recheck(pg, key, rows)
    # Redis, for the erasures it is pending for: what their people own there alone, found by
    # the ledger's entries and their rows (never a scan of every key or every entry)
    redis_pending = [r for r in rows if r["redis_at"] is None]
    if redis_pending:
        theirs = await erasure_reach.theirs(pg, key, keys, redis_pending)
        streams = await erasure_redis.streams(redis, keys, high)
        await erasure_redis.entries(redis, keys, streams, theirs, check, result)
        await erasure_redis.cached_clicks(redis, keys, theirs, result)
        for s in (keys.dead, keys.dead + ":dropped"):
            await erasure_letters.letters(redis, keys, s, streams, redis_pending, check, result, shard)
        await erasure_redis.answers(redis, keys, theirs, check, result, high)
        await erasure_redis.fingerprints(redis, keys, theirs, check, result)
        result.entries_unread = erasure_redis.unread(streams, redis_pending)
        result.entries_unread += await erasure_redis.waiting(redis, keys, redis_pending)
        result.entries_waiting += result.entries_unread  # at least an entry waits in each
    if result.entries_waiting:
        log.info("erasure.redis_waiting", entries=result.entries_waiting, partitions_unread=result.entries_unread)
        return result
    if (short := await fence.held()) is not None:
        log.info("erasure.redis_unreplicated", why=short)  # a failover could bring back what it removed
        return result
    if redis_pending:
        result.redis_done = await _done(pg, "redis_at", redis_pending)
    if store is not None and since:
        await _archive(store, keys, high, min(since), check, result)
    result.archive_done = await _done(pg, "archive_at", rows)
    log.info("erasure.sweep", **{k: v for k, v in result.to_dict().items() if isinstance(v, int)})
    return result


async def _recheck(pg: asyncpg.Pool, key: bytes, rows: list[asyncpg.Record]) -> int:
    """Postgres again, behind the fence (``erasure_late.recheck``): each workspace with an
    erasure whose generation it has not re-checked yet, from that workspace's earliest, and
    only its rows. What made an erasure pending again (a writer that learned something: its
    generation moved) is what a re-check looks for; an erasure pending for its archive alone
    is not re-read every sweep. Each erasure's generation read before the fence is the one
    re-checked: a lesson learned meanwhile moves it on, and the next sweep looks again."""
    due: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        if r["since"] is not None and r["rechecked"] != r["generation"]:
            due.setdefault(str(r["workspace_id"]), []).append(r)
    scrubbed = 0
    for ws, mine in sorted(due.items()):
        scrubbed += await erasure_late.recheck(pg, key, ws, min(r["since"] for r in mine))
        await pg.execute(
            "UPDATE erasures e SET rechecked = x.generation FROM unnest($1::uuid[], $2::bigint[]) AS x(id, generation) "
            "WHERE e.id = x.id",
            [r["id"] for r in mine],
            [r["generation"] for r in mine],
        )
    return scrubbed


async def _done(pg: asyncpg.Pool, place: str, rows: list[asyncpg.Record]) -> list[str]:
    """Mark ``place`` done for the erasures of ``rows``, each only if nothing made it pending
    again since the sweep read it (a worker that met a late copy of theirs, a second erasure,
    this sweep's own lesson: ``erasure.learn``); those the next sweep takes again."""
    done = await pg.fetch(
        f"UPDATE erasures e SET {place} = now() FROM unnest($1::uuid[], $2::bigint[]) AS x(id, generation) "
        "WHERE e.id = x.id AND e.generation = x.generation RETURNING e.id",
        [r["id"] for r in rows],
        [r["generation"] for r in rows],
    )
    return sorted(str(r["id"]) for r in done)


async def _high(redis: Redis, keys: Keys) -> int:
    """One past the last partition whose stream is still in Redis: the layout's, and a
    retired one whose entries no trim takes any more (a person's entry there is theirs too:
    seed 1194045669's lead, in a partition retired when the count went from 8 to 2)."""
    high = (await layout.load(redis, keys, keys.partitions)).high
    there = [p for p, (stream, _, _) in (await layout.existing(redis, keys, range(layout.MOST))).items() if stream]
    return max([high, *(p + 1 for p in there)])


async def _archive(store: Store, keys: Keys, high: int, since: datetime, check: Check, result: SweepResult) -> None:
    start = (int(since.timestamp() * 1000) - 3_600_000, 0)  # the hour before: appended after received
    end = (2**63 - 1, 2**63 - 1)
    for p in range(high):
        for name in await archive_read.segments(store, keys.prefix, p, start, end):
            data = await store.get(name)
            manifest, entries = await asyncio.to_thread(seg.read, data)
            result.segments_read += 1
            rows: list[erased.Row] = [
                (e.id, e.fields if e.fields is not None else {FIELD: e.envelope or b""}) for e in entries
            ]
            async with check.pg.acquire() as conn:
                rows, n = await erased.scrubbed(conn, rows, met=False)
            if not n:
                continue
            again, body = await asyncio.to_thread(seg.build, manifest.partition, rows)
            await store.put(seg.name(keys.prefix, p, again.first_id, again.last_id), body)
            result.segments_rewritten += 1
