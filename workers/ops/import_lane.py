"""The import's lane: how it gives way to live work (docs/import.md#a-lane-of-its-own).

``LiveBacklog`` reads what live work waits for the workers; ``Gate`` decides, before each
batch, whether the import waits, and keeps its share of the wall clock.

The lag bound is relative to what live work shows without the import. A fixed bound on the
oldest entry's age is one a steady live load that the workers keep up with can exceed on
its own (a live batch's read, write and acknowledgement take time; a webhook target, a
slower disk or a busy machine add to it): then no wait ever ends, and an import stores
nothing, forever (20,000 rows beside 200 clicks/s: 0 stored in 170 s). So a wait measures:
while the import rests, the lag live work keeps is its own. Once the import has rested
``SETTLE_S`` and the oldest entry is within ``yield_lag_ms`` of the least age seen while it
rested (the lag does not keep growing), waiting longer would not lower it: live work's own
floor is then the ``FLOOR_QUANTILE`` of the ages seen in that rest, a high percentile and
not the least, since live work's lag jumps about of its own accord on a busy machine, and
the bound is ``yield_lag_ms`` above that floor until ``FLOOR_KEPT_S`` later. Where the lag
keeps growing (no worker running, or the workers stopped) or the backlog stays above
``yield_backlog``, the wait goes on; and in every wait the import says so (``tell``) every
``TELL_EVERY_S``, with the figures it waits on.

The share is halved only for a wait that live work needed: one that lasted ``HALVE_AFTER_S``
and did not end by measuring the floor. A lag that crosses the bound for a poll and is
back under it the next is live work's own noise, not the import's doing (halving for each
such blip kept the share at its least on a loaded machine: 100,000 rows beside 500 clicks/s
did not finish in 26 minutes).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.contract import layout
from ingest.contract.connections import REDIS_ERRORS, Redis
from ingest.contract.keys import GROUP, Keys, parse_id
from workers.ops.status import group_lag

log = structlog.get_logger("workers.imports")

MIN_SHARE = 0.02  # the least share the import comes down to while live work waits
SHARE_STEP = 0.02  # the share regained after each batch that did not wait
SETTLE_S = 1.0  # rested this long, the lag live work keeps is its own
SETTLE_POLL_S = 0.02  # the pause between two reads of the backlog while the floor is measured
FLOOR_QUANTILE = 0.9  # live work's floor: this quantile of the ages seen while rested
HALVE_AFTER_S = 0.5  # a wait this long that measured no floor halves the share
FLOOR_KEPT_S = 30.0  # a measured floor holds this long; then a wait measures it again
TELL_FIRST_S = 2.0  # a wait this long is said (on stderr, by the command) ...
TELL_EVERY_S = 5.0  # ... and again this often while it lasts
POLL_MAX_S = 0.25  # the longest pause between two reads of the backlog in a wait


@dataclass(frozen=True, slots=True)
class Waiting:
    """Live work waiting for the workers: entries (not yet read, or read and not acknowledged)
    and the age of the oldest of them, by Redis's clock (0 when none waits)."""

    entries: int = 0
    oldest_ms: int = 0


class LiveBacklog:
    """The live partitions' backlog in the ``workers`` group: what the import gives way to.
    Redis unreachable counts as none (the edges spool, the workers wait: nothing to give way
    to), said once."""

    def __init__(self, redis: Redis | None, keys: Keys, partitions: int) -> None:
        self.redis, self.keys, self.partitions = redis, keys, partitions
        self._failing = False

    async def entries(self) -> int:
        return (await self.waiting()).entries

    async def waiting(self) -> Waiting:
        if self.redis is None:
            return Waiting()
        try:
            shape = await layout.load(self.redis, self.keys, self.partitions)
            secs, micros = await self.redis.time()
            now_ms = int(secs) * 1000 + int(micros) // 1000
            total, oldest = 0, now_ms
            for p in range(shape.span):
                stream = self.keys.stream(p)
                try:
                    groups = await self.redis.xinfo_groups(stream)
                except ResponseError as exc:
                    if "no such key" not in str(exc):
                        raise
                    continue  # a partition no edge has written yet
                for g in groups:
                    if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) != GROUP:
                        continue
                    last = (await self.redis.xinfo_stream(stream))["last-generated-id"] if g.get("lag") is None else 0
                    lag, _ = await group_lag(self.redis, stream, g, last)
                    total += lag + int(g["pending"])
                    if int(g["pending"]):
                        first = (await self.redis.xpending(stream, GROUP))["min"]
                        oldest = min(oldest, parse_id(first)[0]) if first is not None else oldest
                    if lag:
                        unread = await self.redis.xrange(stream, min="(" + _text(g["last-delivered-id"]), count=1)
                        oldest = min(oldest, parse_id(unread[0][0])[0]) if unread else oldest
        except (*REDIS_ERRORS, KeyError) as exc:
            if not self._failing:
                log.warning("import.backlog_unread", error=exc)
            self._failing = True
            return Waiting()
        self._failing = False
        return Waiting(total, max(0, now_ms - oldest))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Told:
    """What a wait is waiting on, as the import says it."""

    waited_s: float
    waiting: Waiting
    lag_limit_ms: int  # yield_lag_ms above live work's own floor (0: the lag is not waited on)
    floor_ms: int  # the floor in force (0: none measured)
    backlog_limit: int


class Gate:
    """Before each batch: wait while live work waits, and keep to the share (additive
    increase, multiplicative decrease, as TCP's window): halved after a batch that live
    work made wait (``HALVE_AFTER_S``, no floor measured), grown by ``SHARE_STEP`` after one
    that did not, never above ``share``."""

    def __init__(
        self,
        backlog: LiveBacklog,
        yield_backlog: int,
        yield_lag_ms: int,
        share: float,
        tell: Callable[[Told], None] | None = None,
    ) -> None:
        self.backlog, self.tell = backlog, tell
        self.yield_backlog, self.yield_lag_ms, self.share_max = yield_backlog, yield_lag_ms, share
        self.share = share
        self.floor_ms, self._floor_at = 0, 0.0

    def lag_limit_ms(self) -> int:
        if self.yield_lag_ms <= 0:
            return 0
        if time.monotonic() - self._floor_at > FLOOR_KEPT_S:
            self.floor_ms = 0
        return self.floor_ms + self.yield_lag_ms

    def held_back(self, w: Waiting) -> bool:
        limit = self.lag_limit_ms()
        return w.entries > self.yield_backlog or (limit > 0 and w.oldest_ms > limit)

    async def give_way(self, stop: asyncio.Event) -> tuple[bool, float]:
        """Wait while live work waits (or until ``stop``); (held back, seconds waited)."""
        started = time.monotonic()
        pause, behind, floored = 0.01, False, False
        ages: list[int] = []  # the oldest entry's age at each read of this wait
        told_at = started - TELL_EVERY_S + TELL_FIRST_S
        while not stop.is_set() and self.held_back(w := await self.backlog.waiting()):
            behind = True
            now = time.monotonic()
            ages.append(w.oldest_ms)
            if (
                now - started >= SETTLE_S
                and self.yield_lag_ms > 0
                and w.entries <= self.yield_backlog
                and w.oldest_ms <= min(ages) + self.yield_lag_ms
            ):
                # rested, and the lag does not keep growing: what it is now is live work's own
                self.floor_ms, self._floor_at, floored = quantile(ages, FLOOR_QUANTILE), now, True
                log.info(
                    "import.live_floor",
                    floor_ms=self.floor_ms,
                    lag_limit_ms=self.lag_limit_ms(),
                    least_ms=min(ages),
                    reads=len(ages),
                )
                break  # now within the bound: the quantile is at least the least age
            if now - told_at >= TELL_EVERY_S:
                told_at = now
                told = Told(now - started, w, self.lag_limit_ms(), self.floor_ms, self.yield_backlog)
                log.info(
                    "import.giving_way",
                    waited_s=round(told.waited_s, 1),
                    entries=w.entries,
                    oldest_ms=w.oldest_ms,
                    lag_limit_ms=told.lag_limit_ms,
                    yield_backlog=self.yield_backlog,
                )
                if self.tell is not None:
                    self.tell(told)
            await _pause(stop, pause)  # a poll of Redis's backlog: nothing to await but the stop
            # while the floor may yet be measured, reads come often enough to give a quantile
            pause = min(pause * 2, SETTLE_POLL_S if now - started < SETTLE_S else POLL_MAX_S)
        waited = time.monotonic() - started
        if behind and waited >= HALVE_AFTER_S and not floored:
            self.share = max(MIN_SHARE, self.share / 2)
        elif not behind:
            self.share = min(self.share_max, self.share + SHARE_STEP)
        return behind, waited

    def rest_s(self, busy_s: float) -> float:
        """The rest after ``busy_s`` of work that keeps the import to its share."""
        return busy_s * (1 - self.share) / self.share if self.share < 1.0 and busy_s > 0 else 0.0


def quantile(values: list[int], q: float) -> int:
    """The ``q`` quantile of ``values`` (not empty), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
