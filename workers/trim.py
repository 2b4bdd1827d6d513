"""Trimming the streams without ever dropping an entry some group still needs.

For each partition the cut is the lowest of, over every consumer group, its oldest pending
entry (delivered, not acked) or, with nothing pending, the entry after its last-delivered
one; and the retention cut (now - ``retention_s``), so acked entries stay available for
replays. ``XTRIM MINID`` then removes only entries below the cut, never a blind MAXLEN.
A partition without any group is not trimmed at all.
"""

from __future__ import annotations

import time

import structlog
from redis.exceptions import ResponseError

from ingest.connections import Redis
from ingest.keys import Keys, parse_id

log = structlog.get_logger("workers.trim")


async def safe_cut(redis: Redis, stream: str) -> tuple[int, int] | None:
    """The lowest id any group still needs, or None when no group exists."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc):
            return None  # nothing appended yet
        raise
    if not groups:
        return None
    cut: tuple[int, int] | None = None
    for g in groups:
        ms, seq = parse_id(g["last-delivered-id"])
        need = (ms, seq + 1)
        if g["pending"]:
            # read after XINFO: the entries may have been acked in between (no minimum then),
            # and whatever is pending now is at or below the last-delivered id read before
            summary = await redis.xpending(stream, g["name"])
            if summary.get("min") is not None:
                need = min(need, parse_id(summary["min"]))
        cut = need if cut is None else min(cut, need)
    return cut


async def trim(
    redis: Redis, keys: Keys, retention_s: int, *, now_ms: int | None = None, exact: bool = False
) -> dict[str, int]:
    """Trim every partition (and the dead-letter stream, by retention only). Approximate by
    default (``~``: whole radix-tree nodes only, cheap, never past the cut)."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    retention_cut = (now_ms - retention_s * 1000, 0)
    removed: dict[str, int] = {}
    for stream in keys.streams:
        try:
            cut = await safe_cut(redis, stream)
            if cut is None:
                continue
            minid = min(cut, retention_cut)
            n = await redis.xtrim(stream, minid=f"{minid[0]}-{minid[1]}", approximate=not exact)
        except ResponseError as exc:
            # one partition's trouble is not the round's: the others are still trimmed
            log.warning("trim.failed", stream=stream, error=str(exc))
            continue
        if n:
            removed[stream] = n
    for stream in (keys.dead, keys.dead + ":dropped"):  # dead letters, and the ones dropped with a reason
        n = await redis.xtrim(stream, minid=f"{retention_cut[0]}-0", approximate=not exact)
        if n:
            removed[stream] = n
    if removed:
        log.info("trimmed", **removed)
    return removed
