"""A member's claims on the entries it holds: kept fresh while it holds them, handed back
when it stops holding an outage, and taken over from members that died.

Every claim is an XCLAIM with JUSTID (no delivery counted) or an XAUTOCLAIM: none of them
is a deny-OOM command, so all of this works under a full Redis too.
"""

from __future__ import annotations

from typing import Any

import structlog

from ingest.contract.connections import Redis
from ingest.contract.keys import parse_id

log = structlog.get_logger("workers.group")

HAND_BACK_IDLE_MS = 10**12  # "idle since forever": any reclaim takes it
CHUNK = 10_000  # ids per XACK / XCLAIM / XPENDING page
HOLD_CHUNK = 1_000  # ids per HOLD script

# KEYS[1] the stream; ARGV: the group, this member, then ids. Those of the ids pending in this
# member have their idle time reset (XCLAIM JUSTID: no delivery counted) and come back; the
# others are left alone. One script: no reclaim by another member can come between the look
# and the reset, so for ``claim_idle_ms`` after it the entries returned are this member's
# alone. XPENDING and XCLAIM are not deny-OOM: it runs under a full Redis too.
HOLD = """
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then mine[#mine + 1] = ARGV[i] end
end
if #mine > 0 then
  mine[#mine + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
  mine[#mine] = nil
end
return mine
"""


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
            return set(ids) - await self.hold(stream, ids)
        except Exception as exc:
            log.debug("claim_refresh_failed", stream=stream, error=exc)
            return set()

    async def hold(self, stream: str, ids: list[str]) -> set[str]:
        """Those of ``ids`` pending in this member, their idle time reset at once (``HOLD``):
        no other member's reclaim takes them for ``claim_idle_ms`` from then."""
        mine: set[str] = set()
        for i in range(0, len(ids), HOLD_CHUNK):
            reply: Any = await self.redis.eval(  # type: ignore[misc]
                HOLD, 1, stream, self.group, self.name, *ids[i : i + HOLD_CHUNK]
            )
            mine.update(text(x) for x in reply)
        return mine

    async def hand_back(self, stream: str, ids: list[str]) -> None:
        """Leave ``ids`` pending, marked idle for ever, so the next reclaim (by any member)
        takes them without waiting out ``claim_idle_ms``."""
        try:
            for i in range(0, len(ids), CHUNK):
                chunk: list[Any] = ids[i : i + CHUNK]
                await self.redis.xclaim(stream, self.group, self.name, 0, chunk, idle=HAND_BACK_IDLE_MS, justid=True)
        except Exception as exc:
            log.warning("hand_back_failed", stream=stream, error=exc)


def id_after(stream_id: Any) -> str:
    """The smallest id above ``stream_id``: an inclusive range that starts past it."""
    ms, seq = parse_id(stream_id)
    return f"{ms}-{seq + 1}"


def text(v: Any) -> str:
    """An id or a name as Redis returned it (bytes), as ``str``."""
    return v.decode() if isinstance(v, bytes) else str(v)
