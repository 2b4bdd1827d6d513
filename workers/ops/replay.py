"""Replay a stream range into Postgres after an outage or a restore, idempotent by event id.

Each partition is read from two tiers (``workers/ops/replay_source.py``): the archive for
what lies before the oldest entry Redis still holds, Redis for the rest. Redis is read
with XRANGE, never XREADGROUP: the consumer group (pending entries, last-delivered id,
lag) is left exactly as it was, so a replay can run beside live workers. Every page goes
through the worker's own ``store.write_batch``: an event already
stored inserts nothing and moves nothing, so replaying a range twice, or one the workers
are still on, never double counts. Webhook outbox rows for events that turn out to be new
are written by ``write_batch`` in the same transaction; a replay enqueues no job, the
workers' sweep cron delivers them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from arq.worker import func

from ingest.contract import bounds, layout, wire
from ingest.contract.connections import Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.wire import EnvelopeError
from workers.archive.store import open_store
from workers.consumer.enrich import Enricher
from workers.group.errors import is_transient
from workers.ops.replay_shards import DryRun, Target, restore_erasures, write
from workers.ops.replay_source import MAX_SEQ, RangeError, Source, StreamId, count, format_id, parse_id

__all__ = [
    "MAX_SEQ",
    "Range",
    "RangeError",
    "ReplayPlan",
    "ReplayResult",
    "Source",
    "count",
    "format_id",
    "parse_id",
    "plan",
    "replay",
    "replay_job",
]

if TYPE_CHECKING:
    from workers.consumer.consume import Consumer

log = structlog.get_logger("workers.replay")

Progress = Callable[[int, int], None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(at: datetime) -> int:
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Range:
    """Which entries to replay: stream ids ``from_id``..``to_id`` (both inclusive) and/or
    append times ``since`` (inclusive) .. ``until`` (exclusive, so consecutive windows
    tile); given both, their intersection. A stream id's ms part is its append time; a
    naive datetime is UTC. ``partitions`` None means all of them."""

    from_id: str | None = None
    to_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    partitions: tuple[int, ...] | None = None

    def bounds(self) -> tuple[StreamId, StreamId]:
        lo, hi = (0, 0), (MAX_SEQ, MAX_SEQ)
        if self.from_id is not None:
            lo = max(lo, parse_id(self.from_id))
        if self.since is not None:
            lo = max(lo, (_ms(self.since), 0))
        if self.to_id is not None:
            hi = min(hi, parse_id(self.to_id, end=True))
        if self.until is not None:
            hi = min(hi, (_ms(self.until) - 1, MAX_SEQ))
        if lo > hi:
            raise RangeError(f"empty range: its start {format_id(lo)} is after its end {format_id(hi)}")
        return lo, hi

    def streams(self, keys: Keys, high: int | None = None) -> list[tuple[int, str]]:
        """The chosen partitions: of the ``high`` there ever were (a partition count changed:
        ``ingest.contract.layout``; a retired one's entries are in the archive), default
        ``keys.partitions``."""
        n = high or keys.partitions
        chosen = range(n) if self.partitions is None else sorted(set(self.partitions))
        if bad := [p for p in chosen if not 0 <= p < n]:
            raise RangeError(f"no such partition: {bad} (there are {n}: 0..{n - 1})")
        return [(p, keys.stream(p)) for p in chosen]


async def _streams(src: Source, keys: Keys, rng: Range) -> list[tuple[int, str]]:
    return rng.streams(keys, (await layout.load(src.redis, keys, keys.partitions)).high)


@dataclass(slots=True)
class PartitionPlan:
    """What a replay would do, found by doing it in a transaction that is rolled back."""

    entries: int = 0
    archived: int = 0  # of the entries, read from the archive (the rest from Redis)
    new: int = 0  # would be stored
    stored: int = 0  # their event id is in Postgres already
    repeats: int = 0  # by design no row: a repeated lead or conversion (same dedupe key)
    skipped: int = 0  # by design no row: an unknown code, or a click on an inactive link
    undecodable: int = 0
    failed: int = 0  # refused by Postgres for its data (the workers dead-lettered it)


@dataclass(slots=True)
class PartitionResult:
    entries: int = 0
    archived: int = 0  # of the entries, read from the archive (the rest from Redis)
    inserted: int = 0
    duplicates: int = 0  # already stored (by event id, or a repeated lead or conversion)
    skipped: int = 0  # unknown code, or a click on an inactive link: stored by no one
    undecodable: int = 0
    failed: int = 0  # refused by Postgres for its data (the workers dead-lettered it)
    # refunds' copies not restored: their sale is not in Postgres even once every partition
    # was read, or they would pass it (workers.consumer.refunds)
    refunds_not_restored: int = 0


@dataclass(slots=True)
class _Report:
    start: StreamId
    end: StreamId
    partitions: dict[int, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the range, counts per partition (keys are strings) and totals."""
        parts = {str(p): asdict(c) for p, c in sorted(self.partitions.items())}
        totals: dict[str, int] = {}
        for counts in parts.values():
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
        return {
            "range": {"from": format_id(self.start), "to": format_id(self.end)},
            "partitions": parts,
            "totals": totals,
        }

    def total(self, name: str) -> int:
        return sum(int(getattr(c, name)) for c in self.partitions.values())


class ReplayPlan(_Report):
    """The dry run: per partition, entries in range and how many are stored already."""


class ReplayResult(_Report):
    """What a replay did, per partition."""


def _decode(page: list[Any]) -> tuple[list[Envelope], int]:
    """The page's envelopes, and how many entries are not: undecodable, or past the bounds
    of client JSON (``ingest.contract.bounds``), which the workers dead-letter too."""
    good, bad = [], 0
    for _, fields in page:
        try:
            envelope = wire.from_entry(fields or {})
            bounds.check(envelope.payload)
        except (EnvelopeError, bounds.BoundsError):
            bad += 1
        else:
            good.append(envelope)
    return good, bad


async def plan(
    source: Source | Redis,
    pg: Target,
    keys: Keys,
    rng: Range,
    *,
    enricher: Enricher | None = None,
    page_size: int = 1000,
) -> ReplayPlan:
    """The dry run: the replay itself, per partition in one transaction that is rolled back,
    so the counts are what a replay would do (a repeat of an entry earlier in the range is a
    repeat, an unknown code skipped), not a guess. Its row locks are held until the
    partition is counted: workers writing the same links wait that long."""
    src = source if isinstance(source, Source) else Source(source)
    start, end = rng.bounds()
    result = ReplayPlan(start, end)
    for p, stream in await _streams(src, keys, rng):
        part = result.partitions[p] = PartitionPlan()
        dry = DryRun(pg)  # a transaction on each shard the partition's pages touch
        try:
            async for page in src.pages(p, stream, start, end, page_size, part):
                envelopes, bad = _decode(page)
                part.entries += len(page)
                part.undecodable += bad
                if not envelopes:
                    continue
                stored = await dry.stored(envelopes)
                done = PartitionResult()
                await _write(pg, envelopes, enricher, done, dry.pool_of)
                part.new += done.inserted
                part.stored += stored
                part.repeats += max(0, done.duplicates - stored)
                part.skipped += done.skipped
                part.failed += done.failed
        finally:
            await dry.rollback()
    return result


async def replay(
    source: Source | Redis,
    pool: Target,
    keys: Keys,
    rng: Range,
    *,
    enricher: Enricher | None = None,
    batch_size: int = 500,
    progress: Progress | None = None,
) -> ReplayResult:
    """Store every entry of the range that Postgres lacks, one transaction per page.

    Pass the worker's ``enricher``: bot verdicts come from it, and without one a bot's
    click would be counted as a click. ``progress(done, total)`` is called after each page.
    """
    src = source if isinstance(source, Source) else Source(source)
    # the erasures a restore of Postgres lost, back before anything is stored: what the
    # replay brings of an erased person is stored scrubbed (ingest.privacy.erasure_copy)
    await restore_erasures(pool, src.redis, keys)
    start, end = rng.bounds()
    streams = await _streams(src, keys, rng)
    total = sum([await src.count(p, stream, start, end) for p, stream in streams])
    result, done = ReplayResult(start, end), 0
    if progress:
        progress(0, total)
    held: list[tuple[int, Envelope]] = []  # refunds' copies read before their sale
    for p, stream in streams:
        part = result.partitions[p] = PartitionResult()
        async for page in src.pages(p, stream, start, end, batch_size, part):
            envelopes, bad = _decode(page)
            if envelopes:
                held += [(p, e) for e in await _write(pool, envelopes, enricher, part)]
            part.entries += len(page)
            part.undecodable += bad
            done += len(page)
            if progress:
                progress(done, max(total, done))  # the range may be open-ended: entries still arrive
    if held:  # every partition read: their sales are in now, if the range held them
        await _again(pool, held, result)
    if progress:
        progress(done, done)  # an archive segment straddling an end of the range counted whole
    log.info("replay", start=format_id(start), end=format_id(end), **result.to_dict()["totals"])
    return result


async def _write(
    pool: Target,
    envelopes: list[Envelope],
    enricher: Enricher | None,
    part: PartitionResult,
    pool_of: Callable[[str], Awaitable[Any]] | None = None,
) -> list[Envelope]:
    """Store a page (poison halved out), each event on its workspace's shard
    (``workers.ops.replay_shards``); the refunds' copies it could not restore come back."""
    try:
        batch = await write(pool, envelopes, enricher, pool_of)
    except Exception as exc:
        if is_transient(exc):
            raise
        # poison the workers met (and dead-lettered) before: halve until it fails alone
        if len(envelopes) == 1:
            log.error("replay.refused", event_id=str(envelopes[0].event_id), error=exc)
            part.failed += 1
            return []
        mid = len(envelopes) // 2
        return [
            *await _write(pool, envelopes[:mid], enricher, part, pool_of),
            *await _write(pool, envelopes[mid:], enricher, part, pool_of),
        ]
    part.inserted += batch.inserted
    part.duplicates += batch.duplicates
    part.skipped += len(batch.unknown_codes) + len(batch.inactive_codes)
    part.refunds_not_restored += len(batch.refunds_not_restored)
    return batch.refunds_not_restored


async def _again(pool: Target, held: list[tuple[int, Envelope]], result: ReplayResult) -> None:
    """The refunds' copies read before their sale, once every partition is read (a change of
    the partition count between a sale and its refund puts them in two partitions)."""
    for p, e in held:
        part = result.partitions[p]
        part.refunds_not_restored -= 1  # counted when it was held; this _write counts it again if need be
        await _write(pool, [e], None, part)


def _iso(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v is not None else None


async def replay_job(
    ctx: dict[str, Any],
    from_id: str | None = None,
    to_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    partitions: list[int] | None = None,
) -> dict[str, Any]:
    """arq job: ``replay`` with the worker's connections and enricher. Arguments are JSON:
    stream ids as strings, times as ISO 8601 strings. Returns ``ReplayResult.to_dict()``."""
    c: Consumer = ctx["consumer"]
    rng = Range(from_id, to_id, _iso(since), _iso(until), tuple(partitions) if partitions is not None else None)
    s = c.settings
    source = Source(c.redis, open_store(s), c.keys.prefix, replicas=s.ack_replicas, wait_ms=s.ack_wait_ms)
    try:
        result = await replay(
            source, c.pipeline.placement, c.keys, rng, enricher=c.pipeline.enricher, batch_size=c.settings.batch_size
        )
    finally:
        await source.aclose()
    return result.to_dict()


# what the worker registers: a long range outlives arq's default 300 s job timeout, and a
# failed replay is rerun by its operator (it is idempotent), not retried in a loop
REPLAY_JOB = func(replay_job, name="replay", timeout=6 * 3600, max_tries=1)
