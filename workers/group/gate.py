"""Whether a worker may read new entries, and why not.

A partition whose batch met an outage holds that batch and retries it; while Postgres is
the cause, every partition of the worker stops reading new entries (they would only pile
up in memory behind the same outage). A Redis refusal (out of memory, read-only) holds only
the partition that met it: the others keep reading and acking, which is what frees Redis.

One log line per change of state, never one per retry; the state is published for
``refstream status`` and as the ``refstream_worker_blocked{reason}`` gauge. Between retries
the waits grow (``Backoff``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from ingest.contract import clock

log = structlog.get_logger("workers.gate")


class Gate:
    def __init__(self, on_change: Callable[[Gate], None] | None = None) -> None:
        self._held: dict[int, str] = {}  # partition -> reason
        self._open = asyncio.Event()
        self._open.set()
        self.since: float | None = None  # wall-clock time the current blocked state began
        self._since_mono = 0.0
        self.on_change = on_change

    @property
    def reasons(self) -> list[str]:
        return sorted(set(self._held.values()))

    @property
    def blocked(self) -> bool:
        return bool(self._held)

    @property
    def closed(self) -> bool:
        """New reads wait: some partition is held by a Postgres outage."""
        return not self._open.is_set()

    def block(self, partition: int, reason: str) -> None:
        before = self.reasons
        was_blocked = self.blocked
        self._held[partition] = reason
        if any(r.startswith("postgres_") for r in self._held.values()):
            self._open.clear()
        else:
            self._open.set()  # a partition's reason may change (Postgres back, Redis now full)
        if not was_blocked:
            self.since, self._since_mono = clock.now(), time.monotonic()
        if self.reasons != before:
            log.warning("worker.blocked", reasons=self.reasons, partitions=sorted(self._held))
            self._changed()

    def clear(self, partition: int) -> None:
        if partition not in self._held:
            return
        before = self.reasons
        del self._held[partition]
        if not any(r.startswith("postgres_") for r in self._held.values()):
            self._open.set()
        if not self._held:
            log.info("worker.resumed", after_s=round(time.monotonic() - self._since_mono, 2), was=before)
            self.since = None
            self._changed()
        elif self.reasons != before:
            log.warning("worker.blocked", reasons=self.reasons, partitions=sorted(self._held))
            self._changed()

    async def wait_open(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._open.wait()
        except TimeoutError:
            return False
        return True

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


class Backoff:
    """Waits between retries while an outage lasts: doubling from ``first`` up to ``cap``,
    jittered (members that met the same outage do not retry in step)."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.cap, self.delay * 2)
