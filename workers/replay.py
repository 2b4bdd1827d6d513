"""Replay a stream range into Postgres after an outage or a restore, idempotent by event id.

The range is read with XRANGE, never XREADGROUP: the consumer group (pending entries,
last-delivered id, lag) is left exactly as it was, so a replay can run beside live
workers. Every page goes through the worker's own ``store.write_batch``: an event already
stored inserts nothing and moves nothing, so replaying a range twice, or one the workers
are still on, never double counts. Webhook outbox rows for events that turn out to be new
are written by ``write_batch`` in the same transaction; a replay enqueues no job, the
workers' sweep cron delivers them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from arq.worker import func

from ingest.connections import Redis
from ingest.events import FIELD, Envelope, EnvelopeError
from ingest.keys import Keys

from . import store
from .enrich import Enricher
from .errors import is_transient

if TYPE_CHECKING:
    from .consume import Consumer

log = structlog.get_logger("workers.replay")

MAX_SEQ = 2**64 - 1
StreamId = tuple[int, int]
Progress = Callable[[int, int], None]
_ID = re.compile(r"^(\d+)(?:-(\d+))?$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# counts a chunk of a range inside Redis, so a progress total costs no entry transfer
_COUNT = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
if #rows == 0 then return {0, ''} end
return {#rows, rows[#rows][1]}
"""


class RangeError(ValueError):
    """A range that cannot be parsed, or that selects nothing by construction."""


def parse_id(text: str, *, end: bool = False) -> StreamId:
    """A Redis stream id, ``ms-seq`` or ``ms`` (the whole millisecond: from its first
    entry as a start, to its last as an ``end``)."""
    m = _ID.match(text.strip())
    if m is None:
        raise RangeError(f"not a stream id: {text!r} (expected ms-seq or ms)")
    ms, seq = int(m[1]), (int(m[2]) if m[2] is not None else MAX_SEQ if end else 0)
    if ms > MAX_SEQ or seq > MAX_SEQ:
        raise RangeError(f"stream id out of range: {text!r}")
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _ms(at: datetime) -> int:
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(milliseconds=1)


def _after(sid: StreamId) -> StreamId:
    return (sid[0], sid[1] + 1) if sid[1] < MAX_SEQ else (sid[0] + 1, 0)


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

    def streams(self, keys: Keys) -> list[tuple[int, str]]:
        chosen = range(keys.partitions) if self.partitions is None else sorted(set(self.partitions))
        if bad := [p for p in chosen if not 0 <= p < keys.partitions]:
            raise RangeError(f"no such partition: {bad} (there are {keys.partitions}: 0..{keys.partitions - 1})")
        return [(p, keys.stream(p)) for p in chosen]


@dataclass(slots=True)
class PartitionPlan:
    entries: int = 0
    stored: int = 0  # entries whose event id is already in Postgres
    undecodable: int = 0


@dataclass(slots=True)
class PartitionResult:
    entries: int = 0
    inserted: int = 0
    duplicates: int = 0  # already stored (by event id, or a repeated lead or conversion)
    skipped: int = 0  # unknown code, or a click on an inactive link: stored by no one
    undecodable: int = 0
    failed: int = 0  # refused by Postgres for its data (the workers dead-lettered it)


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
        return {"range": {"from": format_id(self.start), "to": format_id(self.end)}, "partitions": parts,
                "totals": totals}  # fmt: skip

    def total(self, name: str) -> int:
        return sum(int(getattr(c, name)) for c in self.partitions.values())


class ReplayPlan(_Report):
    """The dry run: per partition, entries in range and how many are stored already."""


class ReplayResult(_Report):
    """What a replay did, per partition."""


async def count(redis: Redis, stream: str, start: StreamId, end: StreamId, *, chunk: int = 10_000) -> int:
    """Entries of ``stream`` in [start, end], counted inside Redis a chunk at a time."""
    total = 0
    while True:
        reply: Any = redis.eval(_COUNT, 1, stream, format_id(start), format_id(end), str(chunk))
        n, last = await reply
        total += int(n)
        if int(n) < chunk or (sid := parse_id(_s(last))) >= end:
            return total
        start = _after(sid)


async def _pages(redis: Redis, stream: str, start: StreamId, end: StreamId, size: int) -> AsyncIterator[list[Any]]:
    while True:
        page = await redis.xrange(stream, min=format_id(start), max=format_id(end), count=size)
        if page:
            yield page
        if len(page) < size or (last := parse_id(_s(page[-1][0]))) >= end:
            return
        start = _after(last)


def _decode(page: list[Any]) -> tuple[list[Envelope], int]:
    good, bad = [], 0
    for _, fields in page:
        try:
            good.append(Envelope.decode((fields or {})[FIELD]))
        except (KeyError, EnvelopeError):
            bad += 1
    return good, bad


async def plan(redis: Redis, pg: asyncpg.Pool, keys: Keys, rng: Range, *, page_size: int = 1000) -> ReplayPlan:
    """The dry run: reads the range and asks Postgres which event ids it holds; writes nothing."""
    start, end = rng.bounds()
    result = ReplayPlan(start, end)
    for p, stream in rng.streams(keys):
        part = result.partitions[p] = PartitionPlan()
        async for page in _pages(redis, stream, start, end, page_size):
            envelopes, bad = _decode(page)
            part.entries += len(page)
            part.undecodable += bad
            ids = [e.event_id for e in envelopes]
            part.stored += await pg.fetchval("SELECT count(*) FROM events WHERE event_id = ANY($1::uuid[])", ids)
    return result


async def replay(
    redis: Redis,
    pool: asyncpg.Pool,
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
    start, end = rng.bounds()
    streams = rng.streams(keys)
    total = sum([await count(redis, stream, start, end) for _, stream in streams])
    result, done = ReplayResult(start, end), 0
    if progress:
        progress(0, total)
    for p, stream in streams:
        part = result.partitions[p] = PartitionResult()
        async for page in _pages(redis, stream, start, end, batch_size):
            envelopes, bad = _decode(page)
            if envelopes:
                await _write(pool, envelopes, enricher, part)
            part.entries += len(page)
            part.undecodable += bad
            done += len(page)
            if progress:
                progress(done, max(total, done))  # the range may be open-ended: entries still arrive
    log.info("replay", start=format_id(start), end=format_id(end), **result.to_dict()["totals"])
    return result


async def _write(
    pool: asyncpg.Pool, envelopes: list[Envelope], enricher: Enricher | None, part: PartitionResult
) -> None:
    try:
        batch = await store.write_batch(pool, envelopes, enricher)
    except Exception as exc:
        if is_transient(exc):
            raise
        # poison the workers met (and dead-lettered) before: halve until it fails alone
        if len(envelopes) == 1:
            log.error("replay.refused", event_id=str(envelopes[0].event_id), error=repr(exc))
            part.failed += 1
            return
        mid = len(envelopes) // 2
        await _write(pool, envelopes[:mid], enricher, part)
        await _write(pool, envelopes[mid:], enricher, part)
        return
    part.inserted += batch.inserted
    part.duplicates += batch.duplicates
    part.skipped += len(batch.unknown_codes) + len(batch.inactive_codes)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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
    result = await replay(
        c.redis, c.pipeline.pg, c.keys, rng, enricher=c.pipeline.enricher, batch_size=c.settings.batch_size
    )
    return result.to_dict()


# what the worker registers: a long range outlives arq's default 300 s job timeout, and a
# failed replay is rerun by its operator (it is idempotent), not retried in a loop
REPLAY_JOB = func(replay_job, name="replay", timeout=6 * 3600, max_tries=1)
