"""A deadline for request headers, which aiohttp does not have.

aiohttp closes an idle keep-alive connection (``keepalive_timeout``) and caps request
lines and header fields (``max_line_size``, ``max_field_size``), but a client that opens a
connection and sends nothing, or drips a header a byte at a time, holds it for as long as it
likes. ``ConnectionGuard`` adds that deadline from outside aiohttp's protocol, through
public interfaces only: the server's list of connections, swept a few times a second, and
each route's wrapper (``ingest.host.wrap``), which says when a connection's request has arrived (its deadline is
lifted) and when it was answered (the keep-alive deadline starts). Bodies have their own
deadline, where they are read (``ingest.edge.body``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

SWEEP_S = 0.25  # a late connection is closed at most this long after its deadline


@dataclass
class ConnectionGuard:
    """Closes a connection whose request headers are not complete ``header_timeout_s``
    after it opened, or which stays idle ``keepalive_timeout_s`` after an answer."""

    header_timeout_s: float
    keepalive_timeout_s: float
    # connection -> when it is closed unless a request arrives first; None: a request runs
    deadlines: dict[RequestHandler, float | None] = field(default_factory=dict)
    enabled: bool = False

    def busy(self, protocol: Any) -> None:
        if self.enabled and protocol is not None:
            self.deadlines[protocol] = None

    def idle(self, protocol: Any) -> None:
        if self.enabled and protocol is not None:
            # the monotonic clock, as sweep reads it (asyncio.get_running_loop() asks the OS for
            # this process's pid on every call: a system call a request)
            self.deadlines[protocol] = time.monotonic() + self.keepalive_timeout_s

    def sweep(self, connections: list[RequestHandler]) -> int:
        """One pass: new connections get their header deadline, late ones are closed."""
        now = time.monotonic()
        closed = 0
        live = set(connections)
        for gone in [c for c in self.deadlines if c not in live]:
            del self.deadlines[gone]
        for conn in connections:
            if conn not in self.deadlines:
                self.deadlines[conn] = now + self.header_timeout_s
                continue
            deadline = self.deadlines[conn]
            if deadline is not None and now >= deadline:
                conn.force_close()
                del self.deadlines[conn]
                closed += 1
        return closed

    async def run(self, runner: web.BaseRunner) -> None:
        """Sweep ``runner``'s connections until it is cleaned up."""
        self.enabled = True
        try:
            while (server := runner.server) is not None:
                self.sweep(server.connections)
                await asyncio.sleep(SWEEP_S)
        finally:
            self.enabled = False
            self.deadlines.clear()


GUARD = web.AppKey("connection_guard", ConnectionGuard)
