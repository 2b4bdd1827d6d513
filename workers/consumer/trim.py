"""Trimming the streams to a short buffer without ever dropping an entry some group needs.

Redis is a buffer, the archive (``workers/archive/archiver.py``) the history. Per partition the
trim wants to cut at the higher of two marks, keeping whichever is smaller:

- the retention mark: entries older than ``retention_s`` (``REFSTREAM_STREAM_RETENTION_S``);
- the memory mark: the oldest entries beyond the partition's share of ``max_bytes``
  (``REFSTREAM_STREAM_MAX_BYTES`` is a total over the event partitions: each gets
  ``max_bytes / partitions``), measured with ``MEMORY USAGE`` on the stream key (sampled).

That wish is then bounded by the safe cut: the lowest of, over every consumer group (the
workers, the archive, any other), its oldest pending entry (delivered, not acked) or, with
nothing pending, the entry after its last-delivered one. ``XTRIM MINID`` removes only
entries below the cut, never a blind MAXLEN. A partition without any group is not trimmed.
When a group holds the cut below the wish, ``holdback`` says which one and by how much
(``refstream status`` shows it): Redis then grows past its budget rather than lose an entry.

The retention mark is Redis's time (``TIME``), as the stream ids it is compared with are:
never this process's clock (docs/guarantees.md: one clock decides). A process whose own clock differs from
Redis's by more than ``REFSTREAM_CLOCK_SKEW_MAX_S`` trims nothing by time (it logs
``trim.clock_skewed``); the memory mark, which reads no clock, still applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.contract import clock
from ingest.contract.connections import Redis
from ingest.contract.keys import Keys, parse_id

log = structlog.get_logger("workers.trim")

StreamId = tuple[int, int]
MEMORY_SAMPLES = 10  # listpack nodes MEMORY USAGE looks at: the estimate, not an exact count
MAX_STEP = 100_000  # entries the memory mark moves per round at most (a bounded script)
# the id of the entry at a position, found inside Redis (no entry crosses the wire)
_NTH = """
local rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
if #rows == 0 then return false end
return rows[#rows][1]
"""
_COUNT = """
return #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
"""


@dataclass(slots=True)
class Need:
    """What one group still needs: every entry from ``need`` on."""

    group: str
    need: StreamId
    pending: bool  # ``need`` is its oldest pending entry (else: the entry after its last delivered)


@dataclass(slots=True)
class Holdback:
    """One partition's trim: where it wants to cut, where it may, and who holds it back."""

    stream: str
    length: int
    memory_bytes: int
    wish: StreamId  # the higher of the retention and memory marks
    cut: StreamId | None  # the safe cut (None: no group: nothing is trimmed)
    held_by: str | None  # the group whose need is below the wish, the lowest one
    held_entries: int  # entries between that group's need and the wish (capped at MAX_STEP)

    @property
    def minid(self) -> StreamId | None:
        return None if self.cut is None else min(self.wish, self.cut)


async def needs(redis: Redis, stream: str) -> list[Need] | None:
    """Every group's need on ``stream``; None when the stream does not exist."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc):
            return None  # nothing appended yet
        raise
    out = []
    for g in groups:
        ms, seq = parse_id(g["last-delivered-id"])
        need, pending = (ms, seq + 1), False
        if g["pending"]:
            # read after XINFO: the entries may have been acked in between (no minimum then),
            # and whatever is pending now is at or below the last-delivered id read before
            summary = await redis.xpending(stream, g["name"])
            if summary.get("min") is not None:
                oldest = parse_id(summary["min"])
                need, pending = min(need, oldest), oldest <= need
        out.append(Need(_s(g["name"]), need, pending))
    return out


async def safe_cut(redis: Redis, stream: str) -> StreamId | None:
    """The lowest id any group still needs, or None when no group exists."""
    found = await needs(redis, stream)
    return min((n.need for n in found), default=None) if found else None


async def memory_usage(redis: Redis, stream: str) -> int:
    """Bytes the stream key takes (``MEMORY USAGE``, sampled); 0 when it does not exist."""
    used = await redis.memory_usage(stream, samples=MEMORY_SAMPLES)
    return int(used or 0)


async def _memory_mark(redis: Redis, stream: str, length: int, used: int, budget: int) -> StreamId | None:
    """The first entry to keep so that what remains fits ``budget`` (bytes per entry taken
    as the stream's average), or None when it fits already."""
    if budget <= 0 or used <= budget or length == 0:
        return None
    keep = int(length * budget / used)
    drop = min(length - keep, MAX_STEP)
    if drop <= 0:
        return None
    reply: Any = redis.eval(_NTH, 1, stream, str(drop + 1))
    first_kept = await reply
    return parse_id(first_kept) if first_kept else None


async def holdback(
    redis: Redis, stream: str, retention_s: int, budget: int, *, now_ms: int | None, length: int | None = None
) -> Holdback | None:
    """Where the trim of ``stream`` wants to cut and may cut; None when there is no stream.
    ``now_ms`` None: no retention mark (no clock to trust), the memory mark alone."""
    found = await needs(redis, stream)
    if found is None:
        return None
    if length is None:
        length = int(await redis.xlen(stream))
    used = await memory_usage(redis, stream)
    wish: StreamId = (0, 0) if now_ms is None else (max(0, now_ms - retention_s * 1000), 0)
    if (mark := await _memory_mark(redis, stream, length, used, budget)) is not None:
        wish = max(wish, mark)
    cut = min((n.need for n in found), default=None)
    held_by, held = None, 0
    if cut is not None and cut < wish:
        lowest = min(found, key=lambda n: n.need)
        held_by = lowest.group
        counted: Any = redis.eval(_COUNT, 1, stream, _fmt(cut), f"({_fmt(wish)}", str(MAX_STEP))
        held = int(await counted)
        if not held:  # no entry between the need and the wish: nothing is held back
            held_by = None
    return Holdback(stream, length, used, wish, cut, held_by, held)


async def trim(
    redis: Redis,
    keys: Keys,
    retention_s: int,
    max_bytes: int = 0,
    *,
    now_ms: int | None = None,
    exact: bool = False,
    skew_max_s: float = clock.SKEW_MAX_S,
    retiring: range = range(0),
) -> dict[str, int]:
    """Trim every partition (and the dead-letter streams, by retention only). Approximate
    by default (``~``: whole radix-tree nodes only, cheap, never past the cut). The
    retention runs on Redis's ``TIME`` (``now_ms``, for tests), and not at all while this
    process's clock is more than ``skew_max_s`` off it. ``retiring`` partitions (a shrink:
    ``ingest.contract.layout``) are trimmed too, exactly, so that each empties and is retired."""
    if now_ms is None:
        now_ms = await _redis_now_ms(redis, skew_max_s)
    budget = max_bytes // keys.partitions if max_bytes else 0
    removed: dict[str, int] = {}
    retired = {keys.stream(p) for p in retiring}
    for stream in (*keys.streams, *sorted(retired)):
        try:
            hb = await holdback(redis, stream, retention_s, budget, now_ms=now_ms)
            if hb is None or (minid := hb.minid) is None:
                continue
            if hb.held_by is not None:
                log.info(
                    "trim.held_back",
                    stream=stream,
                    group=hb.held_by,
                    entries=hb.held_entries,
                    memory_bytes=hb.memory_bytes,
                )
            n = await _xtrim(redis, stream, _fmt(minid), exact or stream in retired)
        except ResponseError as exc:
            # one partition's trouble is not the round's: the others are still trimmed
            log.warning("trim.failed", stream=stream, error=exc)
            continue
        if n:
            removed[stream] = n
    for stream in (keys.dead, keys.dead + ":dropped"):  # dead letters, and the ones dropped with a reason
        if now_ms is None:
            break
        n = await redis.xtrim(stream, minid=f"{max(0, now_ms - retention_s * 1000)}-0", approximate=not exact)
        if n:
            removed[stream] = n
    if removed:
        log.info("trimmed", **removed)
    return removed


async def _redis_now_ms(redis: Redis, skew_max_s: float) -> int | None:
    """Redis's time in ms; None (and a warning) when this process's clock is more than
    ``skew_max_s`` off it: then nothing is trimmed by time."""
    reference, skew = await clock.redis_skew(redis)
    try:
        clock.check("redis", skew, skew_max_s)
    except clock.Skewed:
        log.warning("trim.clock_skewed", skew_s=round(skew, 3), bound_s=skew_max_s, refused="trim by retention")
        return None
    return int(reference * 1000)


@dataclass(slots=True)
class Memory:
    used: int
    max: int  # 0: no maxmemory set
    ratio: float | None  # used / max, None without a limit
    near_limit: bool


async def redis_memory(redis: Redis, warn_ratio: float) -> Memory:
    """``INFO memory``: used_memory against maxmemory, and whether it passed ``warn_ratio``."""
    info = await redis.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    ratio = used / limit if limit else None
    return Memory(used, limit, ratio, ratio is not None and ratio >= warn_ratio)


async def warn_memory(redis: Redis, warn_ratio: float) -> Memory:
    """One warning line per check while Redis is past ``warn_ratio`` of its maxmemory: the
    edge starts refusing (or spooling) at 100 %, so this is the time to look at what holds
    the trim back (``refstream status``)."""
    mem = await redis_memory(redis, warn_ratio)
    if mem.near_limit:
        log.warning("redis.memory_high", used=mem.used, maxmemory=mem.max, ratio=round(mem.ratio or 0, 3))
    return mem


async def _xtrim(redis: Redis, stream: str, minid: str, exact: bool) -> int:
    """XTRIM MINID, repeated: an approximate trim removes at most 100 nodes' worth of entries
    per call (Redis's default LIMIT with ``~``), and a burst can leave more than that."""
    removed = 0
    for _ in range(MAX_STEP // 1000):
        n = int(await redis.xtrim(stream, minid=minid, approximate=not exact))
        removed += n
        if exact or n == 0:
            break
    return removed


def _fmt(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
