"""Reading the archive back: the segments of one partition that overlap a stream-id range,
and their entries in the shape XRANGE gives (``(id, fields)``: the entry's fields as they
were in the stream, version 3's ``v``, version 2's or version 1's ``e``), so a replay treats both tiers alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.contract.keys import parse_id
from ingest.contract.wire import FIELD
from workers.archive import segment as seg
from workers.archive.store import Store

StreamId = tuple[int, int]
_PER_HOUR_UP_TO = timedelta(days=14)  # a longer (or open) range lists the whole prefix once
_HEAD = 4096  # bytes of a segment that hold its manifest line, compressed


def _hours(start: StreamId, end: StreamId) -> list[str] | None:
    lo = datetime.fromtimestamp(start[0] / 1000, UTC).replace(minute=0, second=0, microsecond=0)
    try:
        hi = datetime.fromtimestamp(end[0] / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None  # open-ended
    if start[0] == 0 or hi - lo > _PER_HOUR_UP_TO:
        return None
    out = []
    while lo <= hi:
        out.append(f"dt={lo:%Y-%m-%d}/hour={lo:%H}")
        lo += timedelta(hours=1)
    return out


async def segments(store: Store, prefix: str, partition: int, start: StreamId, end: StreamId) -> list[str]:
    """Keys of the segments of ``partition`` whose id range overlaps [start, end], by first id."""
    hours = _hours(start, end)
    listed: list[str] = []
    for where in [f"{prefix}/{h}/" for h in hours] if hours is not None else [f"{prefix}/"]:
        listed.extend(await store.list(where))
    found = []
    for key in listed:
        parsed = seg.parse_name(key)
        if parsed is not None and parsed[0] == partition and parsed[1] <= end and parsed[2] >= start:
            found.append((parsed[1], key))
    return [key for _, key in sorted(found)]


async def pages(
    store: Store, prefix: str, partition: int, start: StreamId, end: StreamId, size: int
) -> AsyncIterator[list[Any]]:
    """The archived entries of ``partition`` in [start, end], ``size`` at a time."""
    for key in await segments(store, prefix, partition, start, end):
        _, entries = seg.read(await store.get(key))
        rows = [
            (e.id, e.fields if e.fields is not None else {FIELD: e.envelope})
            for e in entries
            if start <= parse_id(e.id) <= end
        ]
        for i in range(0, len(rows), size):
            yield rows[i : i + size]


async def count(store: Store, prefix: str, partition: int, start: StreamId, end: StreamId) -> int:
    """Lines in the overlapping segments (from their manifests): exact for segments inside
    the range, an upper bound for the (at most a few) that straddle its ends."""
    total = 0
    for key in await segments(store, prefix, partition, start, end):
        total += seg.manifest_of(await store.head(key, _HEAD)).count
    return total
