"""Sliding-window rate limits in Redis: exactly N requests in any rolling window.

One list per subject (client IP or API key) holds the times of the requests admitted in
the window, newest first (a time once per request: two in the same millisecond are two);
a Lua script prunes the times that left the window from its tail, counts and admits
atomically, on one key, so it runs unchanged on a Redis Cluster; on one server, the
requests of a micro-batch are decided in one script (``ingest.edge.scripts``). Time is
Redis's own, so every edge agrees. Refused requests are not recorded: a client that keeps
hammering is let in again as soon as its oldest admitted request leaves the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingest.contract.connections import Command
from ingest.edge.batcher import RedisBatcher
from ingest.link.errors import impossible

# KEYS[1] the subject's list; ARGV[1] window ms, ARGV[2] limit.
# Leaves ``verdict`` = {admitted (1/0), remaining, retry after ms}: scripts that go on from
# it (``ingest.edge.lookup.CHECKED_APPEND``) start with this text. ``rate_window`` is
# ``ingest.edge.scripts``' (one script for every request of a micro-batch: see there).
WINDOW = """
local verdict = rate_window(KEYS[1], ARGV[1], ARGV[2])
"""
SLIDING_WINDOW = WINDOW + "return verdict\n"


def well_formed(reply: object, *, flags: int = 0, values: int = 0) -> bool:
    """Whether ``reply`` can be what a script built on ``WINDOW`` answered: an error reply,
    or the verdict's three integers, then ``flags`` integers, then exactly ``values`` values
    (bytes or nil). Anything else answers another command (``RedisBatcher.execute``'s
    ``check``)."""
    if isinstance(reply, Exception):
        return True
    if type(reply) is not list or len(reply) != 3 + flags + values:
        return False
    head = 3 + flags
    for v in reply[:head]:  # loops, not generators under all(): this runs for every request
        if type(v) is not int:
            return False
    for v in reply[head:]:
        if v is not None and type(v) is not bytes:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after_ms: int

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers of the answer: one shared dict per (limit, remaining,
        Retry-After), made once (the callers hand it to a response, which copies it; never
        change it)."""
        retry = 0 if self.allowed else max(1, -(-self.retry_after_ms // 1000))
        key = (self.limit, self.remaining, retry)
        h = _HEADERS.get(key)
        if h is None:
            if len(_HEADERS) >= HEADER_CACHE:
                _HEADERS.clear()
            h = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining)}
            if not self.allowed:
                h["Retry-After"] = str(retry)
            _HEADERS[key] = h
        return h


HEADER_CACHE = 8192  # (limit, remaining, retry) triples: a few limits, each up to its size
_HEADERS: dict[tuple[int, int, int], dict[str, str]] = {}


class RateLimiter:
    def __init__(self, batcher: RedisBatcher, name: str, *, limit: int, window_ms: int = 60_000) -> None:
        self.name = name  # the route family: part of the key, so families count apart
        self.limit = limit
        self.window_ms = window_ms
        self._sha = batcher.script(SLIDING_WINDOW, keeps_memo=True)  # writes only its set

    def command(self, key: str) -> Command:
        """The script call, to be sent in the same round trip as the request's other reads."""
        return ("EVALSHA", self._sha, 1, key, self.window_ms, self.limit)

    def verdict(self, reply: Any) -> Verdict:
        """From the script's reply (its first three elements: a longer one may follow it).
        An error reply is raised (``Rejected``); a reply that no such script gives raises the
        outcome unknown ``REPLY`` (never an IndexError, never another request's numbers taken
        for a verdict)."""
        if isinstance(reply, Exception):
            raise reply
        if (
            type(reply) is not list
            or len(reply) < 3
            or type(reply[0]) is not int
            or type(reply[1]) is not int
            or type(reply[2]) is not int
        ):
            raise impossible(f"not a rate-limit verdict: a {type(reply).__name__}")
        return Verdict(bool(reply[0]), self.limit, reply[1], reply[2])

    @staticmethod
    def check(replies: list[Any]) -> bool:
        """``RedisBatcher.execute``'s ``check`` for a round trip led by ``command()``."""
        return well_formed(replies[0])
