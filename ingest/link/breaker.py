"""A circuit breaker for a Redis that failed: while it is open, callers are refused at once
rather than each waiting out its own deadline, except one per probe interval (50 ms,
doubling to 1 s) whose outcome tells whether Redis is back. The edge's batcher holds two:
Redis down, and writes short of the durability level (``ingest.link.durability``)."""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger("ingest.link")
PROBE_FIRST_S = 0.05
PROBE_CAP_S = 1.0


class Breaker:
    """Open after a failure; while open, ``allow`` lets one caller through per probe
    interval (50 ms doubling to 1 s): its outcome closes the breaker or keeps it open."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cause: BaseException | None = None  # None: closed
        self._retry_at = 0.0
        self._delay = PROBE_FIRST_S

    @property
    def open(self) -> bool:
        return self.cause is not None

    def allow(self) -> bool:
        if self.cause is None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._delay  # one probe per interval
        self._delay = min(PROBE_CAP_S, self._delay * 2)
        return True

    def probe_now(self) -> None:
        """Something else reached the server (the spool's drain): the next caller probes,
        rather than the one after the interval, which may have grown to a second."""
        if self.cause is not None:
            self._retry_at = 0.0
            self._delay = PROBE_FIRST_S

    def failed(self, exc: BaseException) -> bool:
        """Record a failure; True when it opened the breaker (it was closed)."""
        opened = self.cause is None
        if opened:
            self._retry_at = time.monotonic() + PROBE_FIRST_S
            self._delay = PROBE_FIRST_S * 2
            log.warning(f"{self.name}.open", error=exc)
        self.cause = exc
        return opened

    def succeeded(self) -> None:
        if self.cause is not None:
            log.info(f"{self.name}.closed")
            self.cause = None
            self._delay = PROBE_FIRST_S
