"""Where a replay reads: Redis for what it still holds, the archive for the rest.

``Source.pages`` reads the archive (``workers/archive/read.py``) for what lies before the
oldest entry Redis holds, then Redis with XRANGE, a page at a time. The trim may run
between any two reads (it trims only what every group acked, the archive's included): at
every page, when Redis's oldest entry has moved past where the page should start, what
lies between is read from the archive, so a trim racing a replay loses nothing. Stream
ids, ranges' ends and counts live here too; ``workers.ops.replay`` re-exports what it always
offered.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ingest.contract.connections import Redis
from ingest.contract.errors import Refused, Unreplicated
from ingest.contract.keys import Keys
from ingest.contract.primaries import Primaries
from workers.archive import read as archive_read
from workers.archive.store import Store

MAX_SEQ = 2**64 - 1
StreamId = tuple[int, int]
_ID = re.compile(r"^(\d+)(?:-(\d+))?$")
# counts a chunk of a range inside Redis, so a progress total costs no entry transfer
_COUNT = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
if #rows == 0 then return {0, ''} end
return {#rows, rows[#rows][1]}
"""


class RangeError(Refused, ValueError):
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


def _after(sid: StreamId) -> StreamId:
    return (sid[0], sid[1] + 1) if sid[1] < MAX_SEQ else (sid[0] + 1, 0)


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


async def _first(redis: Redis, stream: str) -> StreamId | None:
    rows = await redis.xrange(stream, count=1)
    return parse_id(_s(rows[0][0])) if rows else None


def _before(sid: StreamId) -> StreamId:
    return (sid[0], sid[1] - 1) if sid[1] > 0 else (sid[0] - 1, MAX_SEQ)


class Source:
    """Where a range's entries are: Redis, and the archive (``store``, under ``prefix``) for
    what Redis no longer holds. Without a store, Redis alone."""

    def __init__(
        self, redis: Redis, archive: Store | None = None, prefix: str = "", *, replicas: int = 0, wait_ms: int = 1000
    ) -> None:
        self.redis, self.archive, self.prefix = redis, archive, prefix
        # REFSTREAM_ACK_DURABILITY=replicas:N: a page is used only once N replicas have it
        self.replicas, self.wait_ms = replicas, wait_ms
        self._primaries: Primaries | None = None  # on a Redis Cluster: the page and its WAIT on one connection

    async def aclose(self) -> None:
        if self._primaries is not None:
            await self._primaries.aclose()
            self._primaries = None

    async def count(self, p: int, stream: str, start: StreamId, end: StreamId) -> int:
        first = await _first(self.redis, stream)
        total = 0
        if self.archive is not None and (first is None or start < first):
            arch_end = end if first is None else min(end, _before(first))
            total += await archive_read.count(self.archive, self.prefix, p, start, arch_end)
        if first is not None and first <= end:
            total += await count(self.redis, stream, max(start, first), end)
        return total

    async def pages(
        self, p: int, stream: str, start: StreamId, end: StreamId, size: int, part: Any
    ) -> AsyncIterator[list[Any]]:
        """Pages of [start, end]: the archive's part first, then Redis's. ``part.archived``
        counts what came from the archive."""
        first = await _first(self.redis, stream)
        if self.archive is not None and (first is None or start < first):
            async for page in self._archived(p, start, end if first is None else min(end, _before(first)), size, part):
                yield page
        if first is None or first > end:
            return
        lo = max(start, first)
        while True:
            page = await self._xrange(stream, lo, end, size)
            head = parse_id(_s(page[0][0])) if page else None
            # checked at every page: the trim may run between any two of them, and what it
            # took from [lo, head) is in the archive (it trims only what every group acked)
            if (head is None or head > lo) and await self._trimmed_past(stream, lo):
                async for gap in self._archived(p, lo, end if head is None else _before(head), size, part):
                    yield gap
            if page:
                yield page
            if len(page) < size or (last := parse_id(_s(page[-1][0]))) >= end:
                return
            lo = _after(last)

    async def _xrange(self, stream: str, lo: StreamId, end: StreamId, size: int) -> Any:
        """A page from Redis. With ``replicas``, a write and a WAIT follow the read on its
        connection: once N replicas have that write they have every entry the page holds
        (replication keeps the primary's order), so a replay never stores what a failover
        can still lose (the edge answered it "may be stored" at most). Short of N:
        ``Unreplicated``; run the replay again once the replicas are back."""
        if not self.replicas:
            return await self.redis.xrange(stream, min=format_id(lo), max=format_id(end), count=size)
        p = Keys.partition_of(stream)
        fence = f"{self.prefix}:replay:fence" if p is None else f"{self.prefix}:replay:fence:{{{p}}}"  # its tag

        def read(pipe: Any) -> None:
            pipe.xrange(stream, min=format_id(lo), max=format_id(end), count=size)
            pipe.set(fence, b"1", px=60_000)
            pipe.execute_command("WAIT", self.replicas, self.wait_ms)

        if isinstance(self.redis, RedisCluster):  # on the connection to the stream's primary
            if self._primaries is None:
                self._primaries = Primaries(self.redis)
            replies = await self._primaries.send(stream, read)
        else:
            pipe: Any = self.redis.pipeline(transaction=False)
            read(pipe)
            replies = await pipe.execute(raise_on_error=False)
        if error := next((r for r in replies if isinstance(r, Exception)), None):
            raise error
        page, _, acked = replies
        if int(acked) < self.replicas:
            raise Unreplicated(f"{acked} of {self.replicas} replicas have the entries read within {self.wait_ms} ms")
        return page

    async def _trimmed_past(self, stream: str, sid: StreamId) -> bool:
        """Whether the trim has removed entries at or after ``sid`` since the first look
        (it trims only what every group, the archive's included, has acked: the archive
        has them)."""
        if self.archive is None:
            return False
        now = await _first(self.redis, stream)
        return now is None or now > sid

    async def _archived(self, p: int, lo: StreamId, hi: StreamId, size: int, part: Any) -> AsyncIterator[list[Any]]:
        assert self.archive is not None
        async for page in archive_read.pages(self.archive, self.prefix, p, lo, hi, size):
            part.archived += len(page)
            yield page


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
