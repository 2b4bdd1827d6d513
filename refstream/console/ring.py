"""The pipeline's last 15 minutes, in this process's memory: a sample every 2 s, read the
way ``refstream status`` reads (``workers.ops.status``), kept in a ring of 450.

A sample is a dict of charts, each a dict of series to one number, so the page draws any
chart the same way: ``{"at_ms": ..., "accepted": {"affitor": 3.5}, "lag": {"0 workers":
2}, ...}`` (``"0 workers"``: partition 0, group ``workers``). A rate's series is there when
it is not zero; a chart not read (Redis or Postgres unreachable, the first sample's
accepted count) is not there at all, which the page draws as no data. Nothing is kept
across restarts: Prometheus keeps the history, the console shows what is happening now.

What it costs Redis per sample: per partition one XINFO STREAM, one XINFO GROUPS, one
XPENDING summary and one XINFO CONSUMERS per group, and an XRANGE of the entries appended
since the last sample (at most ``READ_CAP``; a partition past it is counted to its last id
and flagged); plus INFO memory, XLEN of the dead letters and the workers' hash. Postgres:
one count of the rows stored in the window, by dialect (the BRIN index on processed_at).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import asyncpg
import structlog
from redis.exceptions import ResponseError

from ingest.contract import clock, layout, wire
from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, Redis, cancelled_meanwhile
from ingest.contract.keys import Keys
from ingest.ledger.placement import Placement
from workers.consumer import trim
from workers.group import presence
from workers.ops import status

log = structlog.get_logger("refstream.console")

EVERY_S = 2.0
KEEP = 450  # 15 minutes of samples
READ_CAP = 5000  # entries read per partition per sample to count what was accepted
STORED_DELAY_S = 1.0  # a batch's rows carry its transaction's start: count each window a second late
_STORED = """
SELECT dialect, count(*) AS n FROM events e
WHERE processed_at > now() - make_interval(secs => $1) AND processed_at <= now() - make_interval(secs => $2)
  AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = e.workspace_id AND w.moved_to IS NOT NULL)
GROUP BY dialect
"""
# The count above reads what the BRIN on processed_at names: the ranges it has summarized
# that overlap the window, and every range it has not summarized yet, which is everything
# stored since autovacuum last passed (a fifth of a partition, or all of a young one a
# planner without statistics reads by a sequential scan). So each sample first summarizes
# what was stored since the last (pages read once), and counts with the BRIN: a few
# thousand rows read each time, however large the day's partition.
_SUMMARIZE = """
SELECT coalesce(sum(brin_summarize_new_values(i.inhrelid::regclass)), 0)
FROM pg_inherits i WHERE i.inhparent = 'events_processed_brin'::regclass
"""

Sample = dict[str, Any]


def _per_s(counts: Counter[str], seconds: float) -> dict[str, float]:
    return {k: round(n / seconds, 3) for k, n in sorted(counts.items())}


class Ring:
    """Samples, oldest first; ``since(at_ms)`` gives a page only what it lacks."""

    def __init__(self, keep: int = KEEP) -> None:
        self._samples: deque[Sample] = deque(maxlen=keep)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def since(self, at_ms: int) -> list[Sample]:
        return [s for s in self._samples if s["at_ms"] > at_ms]


class Sampler:
    """Reads one sample every ``EVERY_S``; each partition's cursor is the last entry it
    counted, so every accepted entry is counted once."""

    def __init__(
        self, redis: Redis, pg: asyncpg.Pool, keys: Keys, spool_dirs: Iterable[str], shards: Placement | None = None
    ) -> None:
        self.redis, self.pg, self.keys = redis, pg, keys
        self.shards = shards  # with several, each shard's rows are counted, and its reachability charted
        self.spool_dirs = list(spool_dirs)
        self.ring = Ring()
        self._cursors: dict[str, bytes] = {}
        self._last = time.monotonic()
        self._may_summarize = True  # False once Postgres refused it (``_summarize``)
        self._counting = False  # a sample read Redis before: this one's accepted counts are whole

    async def run(self) -> None:
        while True:
            # the close's cancel may be lost in a client call that then failed as a timeout,
            # which a sample counts as an outage and goes on: the loop, and the close, with it
            cancelled_meanwhile()
            started = time.monotonic()
            self.ring.add(await self.sample())
            cancelled_meanwhile()
            await asyncio.sleep(max(0.1, EVERY_S - (time.monotonic() - started)))

    async def sample(self) -> Sample:
        now = time.monotonic()
        seconds, self._last = max(now - self._last, 0.001), now
        out: Sample = {"at_ms": clock.now_ms()}
        try:
            out.update(await self._redis_part(seconds))
            redis_up = 1
        except REDIS_ERRORS as exc:
            log.warning("console.redis_unreadable", error=type(exc).__name__)
            redis_up = 0
        stored, pg_up, each = await self._stored_everywhere(seconds)
        if pg_up:  # else no count, not a count of none: the chart shows no point there
            out["stored"] = stored
        out["reachable"] = {"redis": redis_up, "postgres": pg_up, **each}
        out["spool"] = {d: status.spool_usage(d).entries for d in self.spool_dirs}
        return out

    async def _stored_everywhere(self, seconds: float) -> tuple[dict[str, float], int, dict[str, int]]:
        """``_stored`` summed over every shard: Postgres is up when every shard is, and
        with several, each one's own series (``postgres b``) says which is not."""
        try:
            pools = await self.shards.pools() if self.shards is not None else {"default": self.pg}
        except (*PG_ERRORS, OSError, TimeoutError) as exc:
            log.warning("console.postgres_unreadable", error=type(exc).__name__)
            return {}, 0, {}
        if len(pools) == 1:
            stored, up = await self._stored(seconds, self.pg)
            return stored, up, {}
        total: dict[str, float] = {}
        each: dict[str, int] = {}
        for name, pool in pools.items():
            counted, each[f"postgres {name}"] = await self._stored(seconds, pool)
            for dialect, rate in counted.items():
                total[dialect] = round(total.get(dialect, 0.0) + rate, 3)
        return dict(sorted(total.items())), min(each.values()), each

    async def _stored(self, seconds: float, pool: asyncpg.Pool) -> tuple[dict[str, float], int]:
        try:
            async with pool.acquire(timeout=5) as conn:
                await self._summarize(conn)
                async with conn.transaction(readonly=True):
                    await conn.execute("SET LOCAL enable_seqscan = off")  # the BRIN, stats or none
                    rows = await conn.fetch(_STORED, seconds + STORED_DELAY_S, STORED_DELAY_S, timeout=5)
        except (*PG_ERRORS, OSError, TimeoutError) as exc:
            log.warning("console.postgres_unreadable", error=type(exc).__name__)
            return {}, 0
        return _per_s(Counter({r["dialect"]: int(r["n"]) for r in rows}), seconds), 1

    async def _summarize(self, conn: asyncpg.Connection) -> None:
        """Summarize the BRIN's new ranges (``_SUMMARIZE``). It waits for no one (a VACUUM or
        an index build holding the table: the next sample does it), and a console whose
        database role does not own the table counts without it, as before."""
        if not self._may_summarize:
            return
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '100ms'")
                await conn.fetchval(_SUMMARIZE, timeout=5)
        except asyncpg.LockNotAvailableError:
            pass
        except asyncpg.PostgresError as exc:  # not the owner; an index not there: count without it
            log.warning("console.brin_not_summarized", error=type(exc).__name__)
            self._may_summarize = False

    async def _redis_part(self, seconds: float) -> Sample:
        secs, micros = await self.redis.time()
        now_ms = int(secs) * 1000 + int(micros) // 1000
        high = (await layout.load(self.redis, self.keys, self.keys.partitions)).high
        accepted: Counter[str] = Counter()
        lag: dict[str, int] = {}
        pending_age: dict[str, float] = {}
        capped = False
        for p in range(high):
            stream = self.keys.stream(p)
            try:
                info = await self.redis.xinfo_stream(stream)
            except ResponseError:
                continue  # not made yet, or retired
            capped |= await self._count(stream, info["last-generated-id"], accepted)
            for g in await status.read_groups(self.redis, stream, info["last-generated-id"], now_ms):
                lag[f"{p} {g.name}"] = g.lag
                pending_age[f"{p} {g.name}"] = round(g.oldest_pending_age_s or 0.0, 1)
        workers = [w for w in await presence.read(self.redis, self.keys, now_ms / 1000) if not w.stale]
        archivers = sum(w.consumer.startswith("archive:") for w in workers)
        mem = await trim.redis_memory(self.redis, 1.0)
        counted, self._counting = self._counting, True  # the first sample starts the count
        return {
            **({"accepted": _per_s(accepted, seconds), "accepted_capped": capped} if counted else {}),
            "lag": lag,
            "pending_age": pending_age,
            "live": {"workers": len(workers) - archivers, "archivers": archivers},
            "memory": {"used": mem.used, **({"max": mem.max} if mem.max else {})},
            "dead": {"letters": await self.redis.xlen(self.keys.dead)},
        }

    async def _count(self, stream: str, last_id: bytes, into: Counter[str]) -> bool:
        """Count the entries appended since this stream's cursor by dialect; True when more
        than ``READ_CAP`` were (the rest is skipped: the chart says so)."""
        cursor = self._cursors.get(stream)
        self._cursors[stream] = last_id
        if cursor is None or cursor == last_id:
            return False  # the first sample starts the count
        page = await self.redis.xrange(stream, min=b"(" + cursor, max=last_id, count=READ_CAP)
        for _, fields in page:
            try:
                into[wire.from_entry(fields).dialect] += 1
            except wire.EnvelopeError:
                into["undecodable"] += 1
        return len(page) >= READ_CAP
