"""The partition layout: how many stream partitions the edges write, and which ones the
workers read, kept in Redis so that ``refstream partitions set N`` changes it live.

- ``count``: the edges route each event to one of partitions ``0 .. count-1``
  (``Keys.partition_for``).
- ``span``: the workers read partitions ``0 .. span-1``: the written ones and those
  retiring (``count .. span-1``) after a shrink, until each is empty.
- ``high``: the most partitions there ever were: replay and the archive look that far.
- ``previous``: the counts the edges wrote within the last idempotency window, with the
  time each stops mattering: a retried keyed request is checked against its key's record
  in the partition it would have had then (``ingest.edge.idempotency``).

Without the key, the layout is ``REFSTREAM_PARTITIONS`` (count = span = high), and the first
running process (an edge, a worker) keeps it in Redis (``adopt``). From then on the count in
Redis wins over the variable: a process started with another ``REFSTREAM_PARTITIONS`` follows
Redis's count and says so in one warning line (``layout.variable_ignored``) naming
``refstream partitions set``, the one way to change it. A rolling restart that changed the
variable (4 → 8 → 4) once left partitions 4-7 written, then read by nobody: their acked
entries never trimmed, and ``refstream status`` not showing them. Streams found past the
variable's count when the layout is first kept (left so by an older build) are kept as
retiring: read until empty, then retired.

The layout is advice; each partition's own keys are the fence. A stream is made only by
``ENSURE`` (which refuses a retired partition), the edges append with ``NOMKSTREAM``, and
``RETIRE`` deletes an empty retiring stream and marks it retired in one script (the mark
shares the stream's hash tag). So an edge that still routes by an old count cannot write
into a partition nobody reads: its append gets no id, and it is refused like any append
Redis refuses (public routes spool, and the spool's drain routes it by the current count).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import structlog
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from ingest.contract import background
from ingest.contract.connections import Redis, cancelled_meanwhile
from ingest.contract.errors import NotSent
from ingest.contract.keys import GROUP, Keys
from ingest.contract.replicated import Replicated

log = structlog.get_logger("ingest.layout")

EVERY_S = 1.0  # how often a running process reads the layout
CLOSE_WITHIN_S = 2.0  # a closing watch waits this long at most for its loop (its Redis call in flight)
# a retiring partition is deleted no sooner than this after the change: every process has
# read the new count by then (a slower one is refused, never lost: see the module doc)
GRACE_MS = 5_000


class PartitionGone(NotSent):
    """An append to a partition whose stream does not exist (``NOMKSTREAM``): it was retired,
    or Redis lost it. Nothing was written: a refusal, as Redis's error replies are (the
    edge's batcher and the spool's drain put it in the append's slot)."""


class Retired(NotSent, ResponseError):
    """A group or stream asked for on a retired partition."""


# KEYS[1] the stream, KEYS[2] its retired mark, KEYS[3] its revived time; ARGV[1] '1' to
# bring a retired partition back (a grow: the time is noted), ARGV[2..] the groups to make
# (from id 0, with the stream). 1, or an error.
ENSURE = """
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[2])
  local t = redis.call('TIME')
  redis.call('SET', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000))
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('RETIRED partition ' .. KEYS[1] .. ' was retired')
end
for i = 2, #ARGV do
  local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[i], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then return r end
end
return 1
"""

# KEYS[1] the stream, KEYS[2] its attempts, KEYS[3] its retired mark, KEYS[4] its revived
# time; ARGV[1] when the layout the caller read (which has it retiring) changed. An empty
# stream (the trim removed only what every group acked, so nothing is pending either) is
# deleted and marked retired: 1; 2 when it was retired already; 3 when a grow made it again
# after that layout (a retire racing a grow would delete a written partition); else 0.
RETIRE = """
local revived = tonumber(redis.call('GET', KEYS[4]) or '0')
if revived >= tonumber(ARGV[1]) then return 3 end
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], '1')
return 1
"""

# KEYS[1] the layout; ARGV[1] what it must hold ('' for nothing), ARGV[2] the new value
SWAP = """
local now = redis.call('GET', KEYS[1]) or ''
if now ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Layout:
    count: int
    span: int
    high: int
    changed_ms: int = 0
    previous: tuple[tuple[int, int], ...] = ()  # (count, until ms): counts of the last window
    raw: bytes = field(default=b"", compare=False)  # as read from Redis ('' when defaulted)

    @classmethod
    def default(cls, partitions: int) -> Layout:
        return cls(partitions, partitions, partitions)

    @property
    def retiring(self) -> range:
        return range(self.count, self.span)

    def earlier(self, now_ms: int) -> tuple[int, ...]:
        """The counts keyed retries may have been routed by, besides ``count``."""
        return tuple(c for c, until in self.previous if until > now_ms and c != self.count)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "count": self.count,
                "span": self.span,
                "high": self.high,
                "changed_ms": self.changed_ms,
                "previous": [list(p) for p in self.previous],
            }
        )

    @classmethod
    def decode(cls, raw: bytes, partitions: int) -> Layout:
        try:
            d = orjson.loads(raw)
            count, span, high = int(d["count"]), int(d["span"]), int(d["high"])
            previous = tuple((int(c), int(u)) for c, u in d.get("previous", ()))
            changed = int(d.get("changed_ms", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("layout.unreadable", raw=raw[:200])
            return cls.default(partitions)
        if not 1 <= count <= span <= high:
            log.error("layout.unreadable", raw=raw[:200])
            return cls.default(partitions)
        return cls(count, span, high, changed, previous, raw)

    def describe(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "span": self.span,
            "retiring": list(self.retiring),
            "high": self.high,
            "changed_ms": self.changed_ms or None,
            "set": bool(self.raw),
        }


MOST = 1024  # the most partitions a layout may have (``set_count``)


async def existing(redis: Redis, keys: Keys, numbers: range) -> dict[int, tuple[bool, bool, bool]]:
    """The partitions of ``numbers`` any of whose keys exist: (stream, attempts, retired mark)."""
    pipe: Any = redis.pipeline(transaction=False)
    for p in numbers:
        pipe.exists(keys.stream(p))
        pipe.exists(keys.attempts(p))
        pipe.exists(keys.retired(p))
    found = await pipe.execute()
    out = {}
    for i, p in enumerate(numbers):
        there = (bool(found[3 * i]), bool(found[3 * i + 1]), bool(found[3 * i + 2]))
        if any(there):
            out[p] = there
    return out


async def adopt(redis: Redis, keys: Keys, partitions: int) -> Layout:
    """Where Redis keeps no layout: keep ``partitions`` (``REFSTREAM_PARTITIONS``) as it, with
    the unretired streams found past it as retiring (read until empty, then retired). The
    layout kept, this one or one another process kept first."""
    found = await existing(redis, keys, range(partitions, MOST))
    span = max([partitions, *(p + 1 for p, (stream, _, retired) in found.items() if stream and not retired)])
    lay = Layout(partitions, span, span, await _now_ms(redis) if span > partitions else 0)
    if await _eval(redis, SWAP, 1, keys.layout, "", lay.encode()):
        log.info("layout.adopted", count=partitions, retiring=list(range(partitions, span)))
        return replace(lay, raw=lay.encode())
    return await load(redis, keys, partitions)


async def load(redis: Redis, keys: Keys, partitions: int) -> Layout:
    """The layout in Redis, or ``partitions`` (``REFSTREAM_PARTITIONS``) where none was set."""
    raw = await redis.get(keys.layout)
    return Layout.default(partitions) if raw is None else Layout.decode(raw, partitions)


async def ensure(redis: Redis, keys: Keys, partition: int, groups: tuple[str, ...], *, revive: bool = False) -> None:
    """Partition ``partition``'s stream with ``groups`` (from id 0); ``Retired`` if it was
    retired (unless ``revive``). Raises what Redis refuses (a full Redis: OOM)."""
    try:
        await _eval(
            redis,
            ENSURE,
            3,
            keys.stream(partition),
            keys.retired(partition),
            keys.revived(partition),
            "1" if revive else "0",
            *groups,
        )
    except ResponseError as exc:
        said = str(exc)
        if "was retired" in said:
            raise Retired(said) from None
        if "-OOM " in said or said.startswith("OOM "):  # Redis's refusal, as a script passes it on
            raise OutOfMemoryError(said) from exc
        if "-READONLY " in said or said.startswith("READONLY "):
            raise ReadOnlyError(said) from exc
        raise


async def groups_of(redis: Redis, keys: Keys, partitions: range) -> tuple[str, ...]:
    """The groups found on ``partitions`` (the workers' at least): a new partition gets each
    of them from id 0, so an archiver not yet reading it misses none of its entries."""
    names = {GROUP}
    for p in partitions:
        try:
            found = await redis.xinfo_groups(keys.stream(p))
        except ResponseError:
            continue  # no such stream
        names.update(g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"]) for g in found)
    return tuple(sorted(names))


async def _eval(redis: Redis, script: str, keys: int, *args: str | bytes | int) -> Any:
    reply: Any = redis.eval(script, keys, *args)  # type: ignore[arg-type]
    return await reply


async def _durable(redis: Redis, replicas: int, wait_ms: int, script: str, keys: int, *args: str | bytes | int) -> Any:
    """``script``, then (at ``REFSTREAM_ACK_DURABILITY=replicas:N``) a WAIT on the same
    connection, on a Redis Cluster to the primary of the script's slot
    (``ingest.contract.replicated``): a layout a failover could lose would leave partitions
    nobody reads."""
    if not replicas:
        return await _eval(redis, script, keys, *args)
    writer = Replicated(redis, replicas, wait_ms)
    try:
        (reply,) = await writer.send([("EVAL", script, keys, *args)], "the partition layout's change")
    finally:
        await writer.aclose()
    return reply


async def _now_ms(redis: Redis) -> int:
    s, us = await redis.time()
    return int(s) * 1000 + int(us) // 1000


async def set_count(
    redis: Redis, keys: Keys, partitions: int, count: int, *, window_ms: int, replicas: int = 0, wait_ms: int = 1000
) -> tuple[Layout, Layout]:
    """Make the edges write ``count`` partitions: (the layout before, after). A grow first
    makes each new partition's stream with every group the others have; a shrink leaves the
    partitions past ``count`` retiring: read until empty, then retired (``retire``). With
    ``replicas``, each step waits for that many replicas (``Unreplicated`` if short)."""
    if not 1 <= count <= 1024:
        raise ValueError(f"a partition count is 1 to 1024, not {count}")
    while True:
        before = await load(redis, keys, partitions)
        if count == before.count:
            return before, before
        if count > before.count:
            groups = await groups_of(redis, keys, range(before.span))
            for p in range(before.count, count):
                await _durable(
                    redis, replicas, wait_ms, ENSURE, 3, keys.stream(p), keys.retired(p), keys.revived(p), "1", *groups
                )
        now = await _now_ms(redis)
        kept = tuple((c, u) for c, u in before.previous if u > now and c not in (count, before.count))
        previous = ((before.count, now + window_ms), *kept)
        after = Layout(count, max(before.span, count), max(before.high, count), now, previous)
        if await _durable(redis, replicas, wait_ms, SWAP, 1, keys.layout, before.raw, after.encode()):
            after = replace(after, raw=after.encode())
            log.info("layout.changed", before=before.count, after=count, span=after.span)
            return before, after


async def retire(
    redis: Redis, keys: Keys, partitions: int, *, grace_ms: int = GRACE_MS, replicas: int = 0, wait_ms: int = 1000
) -> list[int]:
    """Retire every retiring partition that is empty, once the change is ``grace_ms`` old;
    when none is left, the workers read ``count`` partitions again. The partitions retired
    by this call."""
    layout = await load(redis, keys, partitions)
    if not layout.retiring or await _now_ms(redis) < layout.changed_ms + grace_ms:
        return []
    done: list[int] = []
    left = False
    for p in layout.retiring:
        retired = await _durable(
            redis,
            replicas,
            wait_ms,
            RETIRE,
            4,
            keys.stream(p),
            keys.attempts(p),
            keys.retired(p),
            keys.revived(p),
            layout.changed_ms,
        )
        if retired == 3:  # written again: the layout read here is stale, the next call reads anew
            return done
        if retired == 1:
            done.append(p)
        left = left or retired == 0
    if not left:
        await _durable(
            redis, replicas, wait_ms, SWAP, 1, keys.layout, layout.raw, replace(layout, span=layout.count).encode()
        )
    if done:
        log.info("layout.retired", partitions=done, left=left)
    return done


class Watch:
    """A running process's view of the layout, read every ``EVERY_S``; ``keys`` is resized
    to the count the edges write, and ``changed`` hears each new layout."""

    def __init__(self, redis: Redis, keys: Keys, partitions: int, changed: Any = None) -> None:
        self.redis, self.keys, self.partitions = redis, keys, partitions
        self.layout = Layout.default(partitions)
        self._changed = changed
        self._task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self._gone: set[int] = set()
        self._first = asyncio.Event()  # set after the first read (and making), even a failed one
        self._warned = False

    async def read(self) -> Layout:
        """The layout in Redis; where none is kept, this process's ``REFSTREAM_PARTITIONS``
        becomes it (``adopt``). A variable that differs from the count kept is said once."""
        layout = await load(self.redis, self.keys, self.partitions)
        if not layout.raw and await self.redis.get(self.keys.layout) is None:
            layout = await adopt(self.redis, self.keys, self.partitions)
        if layout.raw and layout.count != self.partitions and not self._warned:
            self._warned = True
            log.warning(
                "layout.variable_ignored",
                variable=self.partitions,
                count=layout.count,
                hint=f"REFSTREAM_PARTITIONS={self.partitions} is not the partition count kept in Redis"
                f" ({layout.count}), which wins: change the count with `refstream partitions set"
                f" {self.partitions}`, then set the variable to it",
            )
        if layout != self.layout:
            log.info("layout.read", **layout.describe())
            self.layout = layout
            self.keys.resize(layout.count)
            if self._changed is not None:
                await self._changed(layout)
        return layout

    def poke(self, stream: str | None = None) -> None:
        """Read again now: an append found ``stream`` gone. Where the layout still writes it
        (Redis lost it: a restart without persistence, a flush), the stream is made again."""
        if stream is not None and (p := Keys.partition_of(stream)) is not None:
            self._gone.add(p)
        self._poke.set()

    def start(self, *, make: bool = False) -> None:
        """Read the layout every ``EVERY_S`` from now on; with ``make`` (an edge), first make
        every written partition's stream that does not exist yet: an edge appends only to
        streams that exist."""
        if make:
            self._gone.update(range(self.keys.partitions))
            self._poke.set()
        self._task = asyncio.create_task(self._loop(), name="layout-watch")

    async def ready(self, timeout_s: float = 2.0) -> None:
        """Wait (up to ``timeout_s``: Redis may be away) for the first read and making."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._first.wait()

    async def _loop(self) -> None:
        failing = False
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the close's
            # cancel when it lands as its timeout fires, and the loop would never end
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVERY_S):
                    await self._poke.wait()
            # the close's cancel may be lost in a Redis call that then succeeded (redis-py's
            # send under 3.11's wait_for): the loop would go on for ever, the close with it
            cancelled_meanwhile()
            self._poke.clear()
            try:
                layout = await self.read()
                if mend := sorted(p for p in self._gone if p < layout.count):
                    groups = await groups_of(self.redis, self.keys, range(layout.span))
                    for p in mend:
                        await ensure(self.redis, self.keys, p, groups)
                    log.info("layout.streams_made", partitions=mend)
                self._gone.clear()
            except Exception as exc:  # Redis away: the last layout stands
                cancelled_meanwhile()
                if not failing:
                    log.warning("layout.unread", error=exc)
                failing = True
                self._first.set()
                continue
            failing = False
            self._first.set()

    async def close(self) -> None:
        """Stop the loop: at most ``CLOSE_WITHIN_S`` waiting for it, never for ever."""
        await background.stopped(self._task, "layout watch", CLOSE_WITHIN_S)
        self._task = None
