"""``refstream console``: the operator's pages (``refstream.console``), served on their own
port, apart from the edge."""

from __future__ import annotations

import asyncio
import signal

import click
import uvloop
from aiohttp import web

from ingest.contract.logs import configure_logging
from ingest.contract.settings import Settings
from refstream.console.access import OpenConsole, check_bind
from refstream.console.app import make_app
from refstream.runner import load_settings

from .serve import listen_check

DEFAULT_PORT = 8010


async def run_console(settings: Settings, host: str, port: int, spool_dirs: list[str]) -> None:
    """Serve until SIGTERM or SIGINT. aiohttp's access log is off: the console's URLs carry
    filters (a workspace, a link), and its own log lines say what it read, not who asked."""
    runner = web.AppRunner(make_app(settings, spool_dirs=spool_dirs), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        click.echo(f"refstream console on http://{host}:{port}/", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Off loopback, REFSTREAM_CONSOLE_TOKEN is needed.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option(
    "--spool-dir",
    "spool_dirs",
    multiple=True,
    help="An edge's spool directory to chart (repeatable, one per edge on this host). [default: REFSTREAM_SPOOL_DIR]",
)
def console(host: str, port: int, spool_dirs: tuple[str, ...]) -> None:
    """The operator's console: the pipeline live, a tail of what is accepted, stored and
    dropped, dead letters to retry, replays, pending erasures; and a tenant's links for a
    workspace key of scope read.

    Operator pages ask for REFSTREAM_CONSOLE_TOKEN in the page (sent as a Bearer header);
    without a token the console listens on loopback only and refuses to start elsewhere."""
    settings = load_settings()
    try:
        check_bind(host, settings.console_token)
    except OpenConsole as exc:
        raise click.ClickException(str(exc)) from None
    listen_check(host, port, "console")
    configure_logging(settings.log_level, json=settings.log_json)
    uvloop.run(run_console(settings, host, port, list(spool_dirs) or [settings.spool_dir]))
