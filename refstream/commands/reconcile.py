"""``refstream reconcile``: recount a time window's counters from the event rows, report the
drift, and with ``--fix`` repair it, a chunk of links at a time (workers/ops/reconcile.py).
Results go to stdout (a table, or JSON with ``--json``)."""

from __future__ import annotations

import sys
from datetime import date
from typing import Any

import click
from rich.console import Console

from ingest.contract.connections import create_pg_pool
from ingest.contract.settings import Settings
from refstream import output as out
from refstream.runner import Down, down_line, each_shard, run_reading, settings_and_logging


def _day(_ctx: click.Context, _param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"not a day (YYYY-MM-DD): {value!r}") from None


@click.command()
@click.option("--fix", is_flag=True, help="Set every counter in the window to its recount, a chunk at a time.")
@click.option(
    "--since",
    callback=_day,
    default=None,
    metavar="DAY",
    help="First UTC day recounted (YYYY-MM-DD) [the oldest retained day].",
)
@click.option(
    "--until", callback=_day, default=None, metavar="DAY", help="Recount the days before this one only (YYYY-MM-DD)."
)
@click.option(
    "--chunk",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Links per transaction (with --fix, per lock).",
)
@out.json_option
def reconcile(fix: bool, since: date | None, until: date | None, chunk: int) -> None:
    """Recount the counters of the retained window from the event rows; report the drift.

    Days before the retention's horizon are never recounted (their events are gone; their
    daily stats are the history). With several Postgres shards, every shard is recounted
    (a moved workspace's old copy is not) and each row says its shard; a shard that cannot
    be reached is named, and the exit is 1. Exit 0 when there is no drift (or --fix
    repaired it), 1 when drift was found and left.
    """
    from workers.ops.reconcile import reconcile as recount

    if since is not None and until is not None and until <= since:
        raise click.BadParameter("--until must come after --since", param_hint="--until")
    settings = settings_and_logging()

    async def on(shard: Settings) -> list[dict[str, Any]]:
        pool = await create_pg_pool(shard, min_size=1, max_size=1)
        try:
            return [d.to_dict() for d in await recount(pool, fix=fix, since=since, until=until, chunk=chunk)]
        finally:
            await pool.close()

    done = run_reading(each_shard(settings, on))
    drift = [
        d | ({"shard": name} if len(done) > 1 else {})
        for name, ds in done.items()
        if not isinstance(ds, Down)
        for d in ds
    ]
    result: dict[str, Any] = {"drift": drift, "fixed": fix}
    if len(done) > 1:  # several shards: each one's count, or why it was not recounted
        result["shards"] = [
            d.to_dict() if isinstance(d, Down) else {"shard": n, "reachable": True, "drift": len(d)}
            for n, d in done.items()
        ]
    if out.wants_json():
        out.print_json(result)
    else:
        render_drift(drift, fix, out.console(), result.get("shards"))
    if missed := down_line(done):
        raise click.ClickException(f"not recounted: {missed}")
    if drift and not fix:
        sys.exit(1)


def render_drift(
    drift: list[dict[str, Any]], fixed: bool, console: Console, shards: list[dict[str, Any]] | None = None
) -> None:
    """One row per counter that differs from its event rows (``day``: in ``daily_stats``);
    with several shards, each row's shard, and a line per shard."""
    for s in shards or ():
        said = f"drift in {s['drift']} counters" if "drift" in s else f"DOWN, not recounted: {s['error']}"
        console.print(f"shard {s['shard']}: {said}", markup=False, highlight=False)
    if not drift:
        console.print("no drift: every counter equals its event rows")
        return
    title = "drift, fixed: these counters now equal their event rows" if fixed else "drift (--fix repairs it)"
    shard = ("shard",) if shards else ()
    columns = (*shard, "code", "day", "counter", "stored", "recomputed")
    table = out.table(title, *columns, left=(*shard, "code", "day", "counter"))
    for d in drift:
        table.add_row(
            *((out.cell(d["shard"]),) if shards else ()),
            out.cell(d["code"]),
            out.cell(d.get("day")),
            d["counter"],
            out.cell(d["stored"]),
            out.cell(d["recomputed"]),
        )
    console.print(table)
