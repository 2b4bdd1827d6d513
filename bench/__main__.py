"""``python -m bench`` (``scripts/bench``): the edge, the workers and the whole pipeline
measured side by side against their baselines (bare aiohttp, a naive synchronous design,
Postgres's own ceiling), from one run, with the issue's goals next to the figures."""

from __future__ import annotations

import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import click
import orjson
import uvloop

from bench.context import DEFAULT_PARTS, PARTS, Options
from refstream.output import json_option, wants_json


@click.command()
@click.option("--duration", type=float, default=None, help="Seconds per measurement [10; --quick: 1].")
@click.option("--warmup", type=float, default=None, help="Warm-up seconds before each measurement [3; --quick: 1].")
@click.option("--quick", is_flag=True, help="Short durations, a small drain and backlog: a smoke run.")
@click.option("--runs", type=int, default=3, show_default=True, help="Repeat everything; medians are reported.")
@click.option(
    "--only",
    default=",".join(DEFAULT_PARTS),
    show_default=True,
    help="Comma-separated parts to run; also, only when named: cap (capacity: CPU per event of the"
    " edge, workers, Redis and Postgres; 1 and 2 edges and workers), con (ten open consoles: the edge's and"
    " the worker's CPU at (e)'s half load with and without them), h (replicas:1 against primary),"
    " i (idempotency keys' cost), m (the MIGRATE pause of one partition at 8, 64 and 256 MB),"
    " imp (an import of --import-events rows beside live load: live p99 with and without it),"
    " p (a full events table against an empty one), pgbytes (Postgres bytes per stored click, by table and"
    " index), r (the archiver"
    " against the worker, Redis bytes across retention cycles), shards (the worker's events/s with the workspaces"
    " on one Postgres primary and on two, each a server of the part's own).",
)
@click.option("--connections", type=int, default=32, show_default=True, help="wrk connections (one thread).")
@click.option("--backlog-seconds", type=float, default=None, help="(f) workers stopped this long [60; --quick: 5].")
@click.option("--drain-events", type=int, default=None, help="(d, p, shards) pre-filled events [50000; --quick: 5000].")
@click.option(
    "--fill-rows",
    type=int,
    default=20_000_000,
    show_default=True,
    help="(p, only with --only p) rows already in the events table the worker writes into.",
)
@click.option("--import-events", type=int, default=None, help="(imp) rows imported [1000000; --quick: 5000].")
@click.option(
    "--import-live-rate",
    type=float,
    default=500.0,
    show_default=True,
    help="(imp) live seed 000 clicks per second, open loop, beside the import.",
)
@click.option(
    "--import-args",
    default="",
    help="(imp) more `refstream import` options for the run beside live load, e.g. '--batch-size 100 --share 0.3'.",
)
@click.option("--pgbytes-clicks", type=int, default=None, help="(pgbytes) clicks stored [20000; --quick: 2000].")
@click.option(
    "--con-rate",
    type=float,
    default=None,
    help="(con) clicks per second through the windows [half of (e)'s full load, measured; --quick: 200].",
)
@click.option("--workers", type=int, default=1, show_default=True, help="(e, f) worker processes.")
@click.option(
    "--profile",
    "profile_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="py-spy the edge during (b 000) and the worker during (d); (cap): each tier's top ten over the steady"
    " window (py-spy, Redis commandstats, pg_stat_statements or EXPLAIN); output in this directory.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="NAME=VALUE",
    help="A setting of the edge's and workers' processes, by its field name (REFSTREAM_NAME), e.g. --set"
    " linger_ms=0; repeatable. They see no other REFSTREAM_ variable of the shell's.",
)
@click.option(
    "--record/--no-record",
    default=None,
    help="Append the run to bench/results/ and redraw docs/benchmarks-goals.svg (python -m bench.chart)"
    " [a run is recorded, a --quick one is not].",
)
@json_option
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def bench(
    duration: float | None,
    warmup: float | None,
    quick: bool,
    runs: int,
    only: str,
    connections: int,
    backlog_seconds: float | None,
    drain_events: int | None,
    fill_rows: int,
    import_events: int | None,
    import_live_rate: float,
    import_args: str,
    pgbytes_clicks: int | None,
    con_rate: float | None,
    workers: int,
    profile_dir: Path | None,
    overrides: tuple[str, ...],
    record: bool | None,
    json_out: Path | None,
) -> None:
    """Measure the edge, the workers and the pipeline against their baselines."""
    from bench import report, runner
    from ingest.contract.logs import configure_logging
    from ingest.contract.settings import Settings

    parts = frozenset(p.strip() for p in only.split(",") if p.strip())
    if unknown := parts - set(PARTS):
        choose = ", ".join(PARTS)
        raise click.BadParameter(f"unknown parts {sorted(unknown)}; choose from {choose}", param_hint="--only")
    if profile_dir is not None and not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        raise click.UsageError("--profile needs py-spy: .venv/bin/pip install py-spy")
    settings = Settings()
    configure_logging("warning", json=settings.log_json)
    chosen = _settings(overrides)
    opts = Options(
        duration=duration or (1.0 if quick else 10.0),
        warmup=warmup or (1.0 if quick else 3.0),
        runs=max(1, runs),
        only=parts,
        connections=connections,
        batch_connections=4,
        backlog_seconds=backlog_seconds or (5.0 if quick else 60.0),
        drain_events=drain_events or (5000 if quick else 50_000),
        workers=workers,
        partitions=settings.partitions,
        batch_size=settings.batch_size,
        profile_dir=profile_dir,
        fill_rows=fill_rows,
        import_events=import_events or (5000 if quick else 1_000_000),
        import_live_rate=import_live_rate,
        import_args=tuple(import_args.split()),
        pgbytes_clicks=pgbytes_clicks or (2000 if quick else 20_000),
        con_rate=con_rate or (200.0 if quick else None),
        settings=chosen,
    )
    with ExitStack() as stack:
        result = uvloop.run(runner.bench(opts, stack))
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n"
    if json_out is not None:
        json_out.write_bytes(data)
    if wants_json():  # every figure as one JSON object, no table
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        from rich.console import Console

        report.table(result, Console())
    if record if record is not None else not quick:  # a smoke run (the tests') leaves the records be
        from bench import chart

        saved = report.record(result, "scripts/bench " + " ".join(sys.argv[1:]), quick)
        drawn = chart.write() if chart.CHART.parent.is_dir() else "none (no docs/ beside this bench)"
        print(f"recorded: {saved}; chart: {drawn}", file=sys.stderr)


def _settings(overrides: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``--set NAME=VALUE`` each checked: a field of ``Settings`` the bench does not set
    itself, and a value it accepts."""
    from pydantic import ValidationError

    from bench.runner import BENCH_SETS
    from ingest.contract.settings import Settings

    out: list[tuple[str, str]] = []
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in Settings.model_fields:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE, NAME a setting's field", param_hint="--set")
        if name in BENCH_SETS:
            raise click.BadParameter(f"{name}: the bench sets it itself", param_hint="--set")
        try:
            Settings.model_validate({name: value})
        except ValidationError as exc:
            raise click.BadParameter(f"{item!r}: {exc.errors()[0]['msg']}", param_hint="--set") from None
        out.append((name, value))
    return tuple(out)


if __name__ == "__main__":
    bench()
