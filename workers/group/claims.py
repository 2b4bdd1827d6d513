"""A member's claims on the entries it holds: kept fresh while it holds them, handed back
when it stops holding an outage, and taken over from members that died.

Every claim is an XCLAIM with JUSTID (no delivery counted) or an XAUTOCLAIM: none of them
is a deny-OOM command, so all of this works under a full Redis too.
"""

from __future__ import annotations

from typing import Any

import structlog

from ingest.connections import Redis
from ingest.keys import parse_id

log = structlog.get_logger("workers.group")

HAND_BACK_IDLE_MS = 10**12  # "idle since forever": any reclaim takes it
CHUNK = 10_000  # ids per XACK / XCLAIM / XPENDING page


class Claims:
    """``name``'s claims in ``group``."""

    def __init__(self, redis: Redis, group: str, name: str, claim_idle_ms: int) -> None:
        self.redis, self.group, self.name, self.claim_idle_ms = redis, group, name, claim_idle_ms

    async def reclaim(self, stream: str, count: int) -> int:
        """Claim the entries of ``stream`` idle longer than ``claim_idle_ms`` in other
        (dead) members, ``count`` per XAUTOCLAIM; how many."""
        claimed, start = 0, "0-0"
        for _ in range(1000):  # a bound, for a group with an enormous dead backlog
            reply = await self.redis.xautoclaim(
                stream, self.group, self.name, min_idle_time=self.claim_idle_ms, start_id=start, count=count
            )
            claimed += len(reply[1])
            start = text(reply[0])
            if start == "0-0":
                break
        return claimed

    async def keep(self, stream: str, ids: list[str]) -> set[str]:
        """Reset the idle time of those of ``ids`` still pending in this member (JUSTID: no
        delivery counted), and return the others: another member took them meanwhile (this
        one stalled past ``claim_idle_ms``), or they are pending nowhere (a failover lost
        their delivery, so the group delivers them afresh), or this member acked them while
        settling. Never takes an entry back: another member may be writing it."""
        try:
            mine = await self.owned(stream, ids)
            owned: list[Any] = [i for i in ids if i in mine]
            for i in range(0, len(owned), CHUNK):
                await self.redis.xclaim(stream, self.group, self.name, 0, owned[i : i + CHUNK], justid=True)
            return set(ids) - mine
        except Exception as exc:
            log.debug("claim_refresh_failed", stream=stream, error=repr(exc))
            return set()

    async def owned(self, stream: str, ids: list[str]) -> set[str]:
        """Those of ``ids`` pending in this member."""
        return {i for i, _ in await self._owners(stream, ids, self.name)} & set(ids)

    async def hand_back(self, stream: str, ids: list[str]) -> None:
        """Leave ``ids`` pending, marked idle for ever, so the next reclaim (by any member)
        takes them without waiting out ``claim_idle_ms``."""
        try:
            for i in range(0, len(ids), CHUNK):
                chunk: list[Any] = ids[i : i + CHUNK]
                await self.redis.xclaim(stream, self.group, self.name, 0, chunk, idle=HAND_BACK_IDLE_MS, justid=True)
        except Exception as exc:
            log.warning("hand_back_failed", stream=stream, error=repr(exc))

    async def _owners(self, stream: str, ids: list[str], consumer: str | None = None) -> list[tuple[str, str]]:
        """(id, consumer) of every pending entry in the range of ``ids`` (of ``consumer``'s only)."""
        last = max(ids, key=parse_id)
        start = min(ids, key=parse_id)
        out: list[tuple[str, str]] = []
        while True:
            rows = await self.redis.xpending_range(
                stream, self.group, min=start, max=last, count=CHUNK, consumername=consumer
            )
            out.extend((text(r["message_id"]), text(r["consumer"])) for r in rows)
            if len(rows) < CHUNK:
                return out
            start = id_after(rows[-1]["message_id"])


def id_after(stream_id: Any) -> str:
    """The smallest id above ``stream_id``: an inclusive range that starts past it."""
    ms, seq = parse_id(stream_id)
    return f"{ms}-{seq + 1}"


def text(v: Any) -> str:
    """An id or a name as Redis returned it (bytes), as ``str``."""
    return v.decode() if isinstance(v, bytes) else str(v)
