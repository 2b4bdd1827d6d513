"""``refstream archive``: the archiver process (``workers/archive/archiver.py``), run and stopped like
a worker: several share the ``archive`` group, SIGTERM or SIGINT drains (the segment in
hand is written and acked, or handed back when an outage holds it), Redis and object-store
outages are waited out."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import click
import uvloop

from ingest.contract.connections import connect_redis
from ingest.contract.logs import configure_logging
from ingest.contract.settings import Settings
from refstream import output as out
from refstream import services
from refstream.runner import load_settings, print_data, run_command


async def run_archiver(settings: Settings, *, drain: bool) -> dict[str, Any]:
    from workers.archive.archiver import Archiver
    from workers.archive.store import open_store

    if drain:  # a one-shot command: waits at most REFSTREAM_CONNECT_TIMEOUT_S, then says why
        await services.wait_for_redis(settings)
    redis = connect_redis(settings, max_connections=settings.partitions * 2 + 4)
    archiver = Archiver(
        settings, redis, open_store(settings), name=settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, archiver.stop)
    try:
        await archiver.run(drain=drain)
    finally:
        await asyncio.shield(redis.aclose())
    t = archiver.totals
    return {"segments": t.segments, "entries": t.entries, "already_archived": t.already, "store": archiver.store.url}


@click.command()
@out.json_option
@click.option("--drain", is_flag=True, help="Archive until every stream is read and acked, then exit.")
def archive(drain: bool) -> None:
    """Run an archiver: every accepted entry into compressed hourly segments at
    REFSTREAM_ARCHIVE_URL (a directory, or s3://bucket/prefix).

    Several archivers may run side by side (they share the consumer group "archive");
    SIGTERM writes the segment in hand and acks it before the process exits."""
    if (conflict := load_settings().archive_conflict()) is not None:
        raise click.ClickException(conflict)
    if drain:
        print_data(run_command(lambda settings: run_archiver(settings, drain=True)))
        return
    settings = load_settings()
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms)
    uvloop.run(run_archiver(settings, drain=False))
