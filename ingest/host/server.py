"""Serving the edge: aiohttp's runner with the limits a public server needs (the timeouts
in the settings, aiohttp's decompression off), and its connection guard (``ingest.host.guard``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from ingest.contract.settings import Settings
from ingest.edge.body import RAW_BODIES
from ingest.host.app import METRICS, create_app
from ingest.host.guard import GUARD
from ingest.host.siblings import SIBLINGS, Siblings

log = structlog.get_logger("ingest.serve")

# after a refused body, what the client still sends is read (raw, never inflated) this long
# and dropped, so it reads our answer rather than a reset; then the connection closes
LINGER_S = 2.0
# a drain waits this long for the requests in flight (then aiohttp's shutdown cancels them)
DRAIN_S = 30.0
# aiohttp's own shutdown, after the drain: a handler still running then is cancelled after
# this long (aiohttp's default, 60 s, twice over, held a stopping edge two minutes)
SHUTDOWN_S = 5.0
DRAIN_POLL_S = 0.02
# then keep-alive connections stay open this long, each next request answered with
# "Connection: close", so a client sending on one as the drain starts is answered
KEEPALIVE_GRACE_S = 1.0


class Draining:
    """Set when the edge drains: every answer from then on says ``Connection: close``."""

    on = False


DRAINING = web.AppKey("draining", Draining)


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    if request.app[DRAINING].on:
        response.force_close()  # the server closes after it...
        # ...and the client must know: aiohttp wrote its Connection header before this hook
        response.headers["Connection"] = "close"


def make_runner(settings: Settings, app: web.Application | None = None) -> web.AppRunner:
    """The edge's runner: aiohttp's limits from the settings, its decompression off (bodies
    are inflated under the cap in ``ingest.edge.body``)."""
    app = create_app(settings) if app is None else app
    app[RAW_BODIES] = True
    app[DRAINING] = Draining()
    app.on_response_prepare.append(_close_when_draining)
    return web.AppRunner(
        app,
        access_log=None,  # the app logs one canonical line per request itself
        keepalive_timeout=settings.keepalive_timeout_s,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        lingering_time=min(LINGER_S, settings.body_timeout_s),
        shutdown_timeout=SHUTDOWN_S,
        auto_decompress=False,
    )


@dataclass
class Served:
    runner: web.AppRunner
    guard: asyncio.Task[None]
    url: str

    async def close(self) -> None:
        """A drain: stop accepting; let the requests in flight finish; keep idle keep-alive
        connections open ``KEEPALIVE_GRACE_S``, each one's next request answered with
        ``Connection: close`` (a client may be sending on one as the drain starts); let
        those finish too; then aiohttp's own shutdown (what is left idle is closed) and the
        app's cleanup (micro-batcher, spool, drops tally flushed)."""
        for site in list(self.runner.sites):
            await site.stop()
        self.runner.app[DRAINING].on = True
        # a connection accepted just before the stop gets its protocol on a later turn of
        # the loop (uvloop calls connection_made soon after the accept): count it in
        await asyncio.sleep(DRAIN_POLL_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                await _in_flight_done(self.runner)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE_GRACE_S):
                        await _connections_closed(self.runner)
                await _in_flight_done(self.runner)
        self.guard.cancel()
        await asyncio.gather(self.guard, return_exceptions=True)
        await self.runner.cleanup()


async def _in_flight_done(runner: web.AppRunner) -> None:
    """Until no connection has a request in progress or is yet to send its first one (the
    guard closes those that send nothing). aiohttp's shutdown stops
    reading every connection at once: a request whose body is still arriving would wait
    for it in vain (and answer 408), and a connection accepted just before the listener
    closed would be closed unanswered. aiohttp's own flags say which (its shutdown waits
    on ``_request_in_progress`` too)."""
    while (server := runner.server) is not None and any(_busy(c) for c in server.connections):  # noqa: ASYNC110
        await asyncio.sleep(DRAIN_POLL_S)  # aiohttp has no event for "a request finished" outside the app


async def _connections_closed(runner: web.AppRunner) -> None:
    """Until every connection is closed: each closes after its next answer (``Connection:
    close``), so a client that keeps sending leaves none open."""
    while (server := runner.server) is not None and server.connections:  # noqa: ASYNC110
        await asyncio.sleep(DRAIN_POLL_S)


def _busy(conn: object) -> bool:
    return bool(getattr(conn, "_request_in_progress", False)) or getattr(conn, "_request_count", 1) == 0


async def start(settings: Settings, host: str, port: int, app: web.Application | None = None) -> Served:
    """The edge listening on ``host:port``, with its connection guard running."""
    runner = make_runner(settings, app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    guard = runner.app[GUARD]
    return Served(runner, asyncio.create_task(guard.run(runner)), f"http://{host}:{port}")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _no_reload() -> None:
    log.warning(
        "serve.sighup_ignored",
        why="one process, no supervisor: a reload needs --processes 2 or more",
        do="restart it behind a balancer, or run more processes",
    )


async def serve(settings: Settings, host: str, port: int, print: Callable[[str], None]) -> None:
    """``refstream serve`` (one process): until SIGINT or SIGTERM, then a graceful shutdown.
    SIGHUP, which reloads under a supervisor, is logged and ignored: its default would end
    the process at once, its requests in flight unanswered."""
    served = await start(settings, host, port)
    stop = _stop_event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _no_reload)
    print(f"======== Running on {served.url} ========\n(Press CTRL+C to quit)")
    try:
        await stop.wait()
    finally:
        await served.close()


async def serve_child(settings: Settings, socks: list[socket.socket], ready_fd: int, rundir: Path) -> None:
    """One process of ``refstream serve --processes N`` (``ingest.host.prefork``): serves the
    listening sockets its supervisor bound, says so on ``ready_fd`` once it accepts, and on
    SIGTERM (or SIGINT) drains: stops accepting, finishes the requests in flight, flushes
    what it holds (micro-batcher, spool, drops tally: the app's cleanup), then leaves its
    final metrics for its siblings' sums (``ingest.host.siblings``)."""
    stop = _stop_event()
    runner = make_runner(settings)
    siblings = runner.app[SIBLINGS] = Siblings(rundir)
    await runner.setup()
    guard: asyncio.Task[None] | None = None
    try:
        for sock in socks:
            await web.SockSite(runner, sock).start()
        guard = asyncio.create_task(runner.app[GUARD].run(runner))
        await siblings.expose(runner.app[METRICS].registry)
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        await stop.wait()
    finally:
        served = Served(runner, guard or asyncio.create_task(asyncio.sleep(0)), "")
        await served.close()  # the sites stop, in-flight requests finish, then the app's cleanup
        await siblings.retire(runner.app[METRICS].registry)
