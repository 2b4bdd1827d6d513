"""Serving the edge: aiohttp's runner with the limits a public server needs (the timeouts
in the settings, aiohttp's decompression off), and its connection guard (``ingest.guard``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .app import create_app
from .body import RAW_BODIES
from .guard import GUARD
from .settings import Settings

# after a refused body, what the client still sends is read (raw, never inflated) this long
# and dropped, so it reads our answer rather than a reset; then the connection closes
LINGER_S = 2.0


def make_runner(settings: Settings, app: web.Application | None = None) -> web.AppRunner:
    """The edge's runner: aiohttp's limits from the settings, its decompression off (bodies
    are inflated under the cap in ``ingest.body``)."""
    app = create_app(settings) if app is None else app
    app[RAW_BODIES] = True
    return web.AppRunner(
        app,
        access_log=None,  # the app logs one canonical line per request itself
        keepalive_timeout=settings.keepalive_timeout_s,
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        lingering_time=min(LINGER_S, settings.body_timeout_s),
        auto_decompress=False,
    )


@dataclass
class Served:
    runner: web.AppRunner
    guard: asyncio.Task[None]
    url: str

    async def close(self) -> None:
        self.guard.cancel()
        await asyncio.gather(self.guard, return_exceptions=True)
        await self.runner.cleanup()


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


async def serve(settings: Settings, host: str, port: int, print: Callable[[str], None]) -> None:
    """``refstream serve``: until SIGINT or SIGTERM, then a graceful shutdown."""
    served = await start(settings, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"======== Running on {served.url} ========\n(Press CTRL+C to quit)")
    try:
        await stop.wait()
    finally:
        await served.close()
