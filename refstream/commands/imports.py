"""``refstream import FILE``: history from another system, each row once, in a lane that gives
way to live traffic (``workers.ops.imports``; docs/import.md).

Progress (rows, rate, and for a file its bytes and the time left) goes to stderr, and so
does each wait for live work longer than 2 s, with the figures it waits on; the summary
(read, stored, duplicates, refused by reason) to stdout, a table or ``--json``.

Ctrl-C stops it after the batch in flight (a second one at once) and prints the summary so
far, with the line to go on from (``--start-line``). The exit code: 0 every row stored or
known, 3 some refused (listed with their lines), 130 stopped before the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click
import structlog
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ingest.contract.connections import connect_redis, create_pg_pool
from ingest.contract.keys import Keys
from ingest.ledger.placement import Moved
from refstream import output as out
from refstream.runner import run_reading, settings_and_logging, shard_urls, workspace_shard

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import asyncpg

    from ingest.contract.connections import Redis
    from ingest.contract.settings import Settings
    from workers.consumer.enrich import Enricher
    from workers.ops import backend_nice
    from workers.ops.import_lines import Lines
    from workers.ops.imports import Options, Summary, Told

log = structlog.get_logger("refstream.import")

EXIT_REFUSED = 3  # the import read to the end; some rows were refused
EXIT_STOPPED = 130  # stopped (Ctrl-C) before the end: the summary says where to go on


def _workspace(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a workspace id (a UUID)", param_hint="--workspace") from None


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--workspace", required=True, metavar="W", help="The workspace id the rows belong to.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "csv", "dub"]),
    default=None,
    help="ndjson, csv, or an export reader (dub); default: csv for a .csv file, else ndjson.",
)
@click.option(
    "--source",
    default=None,
    help="The system the rows come from, part of each row's id (default: refstream, or the reader).",
)
@click.option("--commissions", is_flag=True, help="Earn commissions for imported leads and sales by today's rules.")
@click.option("--webhooks", is_flag=True, help="Send webhooks for what the import stores (off: history).")
@click.option("--fraud", is_flag=True, help="Run the fraud rules on imported clicks and leads (off: history).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option(
    "--yield-backlog",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Wait while more live entries than this wait for the workers.",
)
@click.option(
    "--yield-lag-ms",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Wait while the oldest live entry has waited longer than this, and lower the share (0: never).",
)
@click.option(
    "--share",
    type=click.FloatRange(0.05, 1.0),
    default=0.5,
    show_default=True,
    help="At most this share of the wall clock spent writing (1: as fast as Postgres takes it).",
)
@click.option(
    "--nice",
    "niceness",
    type=click.IntRange(0, 19),
    default=10,
    show_default=True,
    help="Lower the CPU priority of this process, and of its Postgres backends where Postgres "
    "verifiably runs on this machine, by this much (0: as any other process).",
)
@click.option(
    "--start-line",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Go on from this line of FILE (the line a stopped import printed); earlier rows are skipped.",
)
@out.json_option
def import_(
    file: str,
    workspace: str,
    fmt: str | None,
    source: str | None,
    commissions: bool,
    webhooks: bool,
    fraud: bool,
    batch_size: int,
    yield_backlog: int,
    yield_lag_ms: int,
    share: float,
    niceness: int,
    start_line: int,
) -> None:
    """Import clicks, leads, sales and refunds from FILE (NDJSON or CSV; - for stdin).

    Each row's event id derives from its source id, so a second run of the same file, or a
    run stopped and started again, stores nothing twice. Rows go to Postgres through the
    workers' own batch transaction, not through the live streams, and wait while live work
    is waiting. No webhooks, fraud flags or commissions unless asked.

    Exit 0: every row stored (or stored before); 3: some rows refused; 130: stopped by
    Ctrl-C, the summary saying which --start-line goes on."""
    from workers.ops import import_formats, import_lines, imports

    ws = _workspace(workspace)
    if niceness:
        os.nice(niceness)
    fmt = fmt or import_formats.guess(file)
    settings = settings_and_logging()
    opts = imports.Options(
        ws,
        source or ("refstream" if fmt in ("ndjson", "csv") else fmt),
        webhooks=webhooks,
        fraud=fraud,
        commissions=commissions,
        batch_size=batch_size,
        yield_backlog=yield_backlog,
        yield_lag_ms=yield_lag_ms,
        share=share,
        retention_days=settings.event_retention_days,
        partitions=settings.partitions,
        start_line=start_line,
    )
    stream, size = _open(file)
    lines = import_lines.Lines(stream)  # read in chunks, a line at a time: never the file whole
    run = _Run(file, fmt, opts, settings, niceness, stream, size, lines)
    result = run_reading(_go(run))
    if out.wants_json():
        out.print_json(result)
    else:
        render(result, out.console())
    if not result["finished"]:
        sys.exit(EXIT_STOPPED)
    if result["refused_total"]:
        sys.exit(EXIT_REFUSED)


def _open(file: str) -> tuple[BinaryIO, int | None]:
    """FILE's stream and its size in bytes (None for stdin, ``-``)."""
    if file == "-":
        return sys.stdin.buffer, None
    path = Path(file)
    if not path.is_file():
        raise click.BadParameter(f"no file {file}", param_hint="FILE")
    return path.open("rb"), path.stat().st_size


@dataclass(frozen=True, slots=True)
class _Run:
    """What one ``refstream import`` imports, and how: the command line's choices."""

    file: str
    fmt: str
    opts: Options
    settings: Settings
    niceness: int
    stream: BinaryIO
    size: int | None  # None: stdin, no bar to fill
    lines: Lines


async def _go(run: _Run) -> dict[str, Any]:
    """The import from start to summary: the pool (its backends niced), Redis, the enricher,
    the progress bar, and Ctrl-C's handler, each closed or removed at the end."""
    from workers.consumer.enrich import Enricher

    ws = run.opts.workspace_id
    shard, settings = await workspace_shard(run.settings, ws)  # its rows go to its shard
    sharded = len(await shard_urls(run.settings)) > 1
    niced: list[backend_nice.Outcome] = []
    console = Console(stderr=True)
    stop = asyncio.Event()
    running: list[asyncio.Task[Summary]] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, _on_ctrl_c(console, stop, running))
    pool = await create_pg_pool(settings, min_size=1, max_size=2, init=_backend_lowerer(run.niceness, niced))
    redis = connect_redis(settings)
    enricher = Enricher(city_db=settings.city_db)
    keys = Keys(settings.stream_prefix, settings.partitions)
    if not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1)", uuid.UUID(ws)):
        raise click.ClickException(f"no workspace {ws}")
    try:
        try:
            summary = await _import_with_progress(run, console, pool, redis, keys, enricher, stop, running)
        except Moved:
            raise click.ClickException(
                "the workspace moved to another shard during the import: run it again"
                " (what is stored is not stored twice)"
            ) from None
        backends = {
            "niceness": run.niceness,
            "lowered": sum(o.applied for o in niced),
            "of": len(niced),
            "why_not": sorted({o.why for o in niced if not o.applied}),
        }
        return (
            summary.to_dict()
            | {
                "file": run.file,
                "format": run.fmt,
                "source": run.opts.source,
                "workspace": ws,
                "backend_nice": backends,
            }
            | ({"shard": shard} if sharded else {})
        )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        enricher.close()
        await pool.close()
        await redis.aclose()
        with contextlib.suppress(OSError):
            run.stream.close()


def _on_ctrl_c(console: Console, stop: asyncio.Event, running: list[asyncio.Task[Summary]]) -> Callable[[], None]:
    """SIGINT's handler: the first stops after the batch in flight, a second one at once."""

    def interrupted() -> None:  # Ctrl-C: the batch in flight ends; a second one, at once
        if not stop.is_set():
            stop.set()
            console.print(
                "import: stopping after the batch in flight (Ctrl-C again to stop at once)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        else:
            for t in running:
                t.cancel()

    return interrupted


def _backend_lowerer(
    niceness: int, niced: list[backend_nice.Outcome]
) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """The pool's ``init``: each new backend's CPU priority lowered by ``niceness`` where it
    can be, each outcome appended to ``niced``."""

    from workers.ops import backend_nice

    async def lower_backend(conn: asyncpg.Connection) -> None:
        outcome = await backend_nice.lower(conn, niceness)
        if not niced or outcome.applied != niced[-1].applied:  # said once, and again on a change
            log.info(
                "import.backend_nice",
                pid=outcome.pid,
                applied=outcome.applied,
                niceness=niceness,
                why=outcome.why or None,
            )
        niced.append(outcome)

    return lower_backend


async def _import_with_progress(
    run: _Run,
    console: Console,
    pool: asyncpg.Pool,
    redis: Redis,
    keys: Keys,
    enricher: Enricher,
    stop: asyncio.Event,
    running: list[asyncio.Task[Summary]],
) -> Summary:
    """The rows imported under the progress bar (on stderr); a second Ctrl-C's cancel ends
    it with what committed before it."""
    from workers.ops import import_formats, imports

    columns = (
        TextColumn("import"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TextColumn("{task.fields[rate]:,.0f}/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=not console.is_terminal) as bar:
        task: TaskID = bar.add_task("import", total=run.size, rows=0, rate=0.0)

        def progress(s: Summary) -> None:
            elapsed = bar.tasks[0].elapsed or 0.0
            bar.update(task, completed=run.lines.bytes, rows=s.read, rate=s.read / elapsed if elapsed else 0.0)

        def tell(t: Told) -> None:
            console.print(giving_way(t, importer.summary), markup=False, highlight=False, soft_wrap=True)

        importer = imports.Importer(
            pool, run.opts, imports.LiveBacklog(redis, keys, run.settings.partitions), enricher, progress, stop, tell
        )
        running.append(asyncio.ensure_future(importer.run(import_formats.READERS[run.fmt](run.lines))))
        try:
            return await running[0]
        except asyncio.CancelledError:
            if not running[0].cancelled():
                raise
            return importer.summary  # the second Ctrl-C: what committed before it


def giving_way(t: Told, s: Summary) -> str:
    """The line a long wait for live work says on stderr: the figures it waits on."""
    w = t.waiting
    lag = (
        (
            f"the oldest live entry has waited {w.oldest_ms:,} ms (threshold {t.lag_limit_ms:,} ms"
            + (f": {t.floor_ms:,} ms live work keeps alone + --yield-lag-ms" if t.floor_ms else ", --yield-lag-ms")
            + ")"
        )
        if t.lag_limit_ms
        else "the lag is not waited on (--yield-lag-ms 0)"
    )
    return (
        f"import: giving way to live work for {t.waited_s:.0f} s: {lag}; {w.entries:,} live entries wait "
        f"(threshold {t.backlog_limit:,}, --yield-backlog); {s.stored:,} rows stored so far"
    )


def render(result: dict[str, Any], console: Console) -> None:
    on = f", on shard {result['shard']}" if "shard" in result else ""
    console.print(
        f"import of {result['file']} ({result['format']}, source {result['source']}{on})", markup=False, highlight=False
    )
    table = out.table("rows", "", "count", left=("",))
    for name in ("read", "stored", "duplicates"):
        table.add_row(name, f"{result[name]:,}")
    if result["scrubbed"]:
        table.add_row("  of the stored, scrubbed (erased people)", f"{result['scrubbed']:,}")
    table.add_row("refused", f"{result['refused_total']:,}", style="bold" if result["refused_total"] else None)
    for reason, n in result["refused"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    console.print(table)
    for reason, shown in result["examples"].items():
        console.print(f"{reason}: " + "; ".join(shown), markup=False, highlight=False)
    console.print(
        f"{result['seconds']:.1f} s, of which {result['waited_s']:.1f} s giving way to live work and "
        f"{result['rested_s']:.1f} s resting to keep to its share"
    )
    if not result["finished"]:
        console.print(
            f"stopped before the end: every row before line {result['resume_line']:,} is done; to go on, "
            f"run the same command with --start-line {result['resume_line']}",
            markup=False,
            highlight=False,
        )
