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
from refstream import output as out
from refstream.runner import run_reading, settings_and_logging


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
    daily stats are the history). Exit 0 when there is no drift (or --fix repaired it), 1
    when drift was found and left.
    """
    from workers.ops.reconcile import reconcile as recount

    if since is not None and until is not None and until <= since:
        raise click.BadParameter("--until must come after --since", param_hint="--until")
    settings = settings_and_logging()

    async def go() -> list[dict[str, Any]]:
        pool = await create_pg_pool(settings, min_size=1, max_size=1)
        try:
            return [d.to_dict() for d in await recount(pool, fix=fix, since=since, until=until, chunk=chunk)]
        finally:
            await pool.close()

    drift = run_reading(go())
    if out.wants_json():
        out.print_json({"drift": drift, "fixed": fix})
    else:
        render_drift(drift, fix, out.console())
    if drift and not fix:
        sys.exit(1)


def render_drift(drift: list[dict[str, Any]], fixed: bool, console: Console) -> None:
    """One row per counter that differs from its event rows (``day``: in ``daily_stats``)."""
    if not drift:
        console.print("no drift: every counter equals its event rows")
        return
    title = "drift, fixed: these counters now equal their event rows" if fixed else "drift (--fix repairs it)"
    table = out.table(title, "code", "day", "counter", "stored", "recomputed", left=("code", "day", "counter"))
    for d in drift:
        table.add_row(
            out.cell(d["code"]), out.cell(d.get("day")), d["counter"], out.cell(d["stored"]), out.cell(d["recomputed"])
        )
    console.print(table)
