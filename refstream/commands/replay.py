"""``refstream replay`` and ``refstream reconcile``: put Postgres right after an outage.

``replay`` re-reads a stream range (by id or by time) into Postgres, counting nothing
twice; ``reconcile`` recounts every counter from the event rows and reports (or repairs)
the drift. Results go to stdout (a table, or JSON with ``--json``); progress to stderr.
"""

from __future__ import annotations

from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ingest.contract.connections import connect_redis, create_pg_pool
from ingest.contract.keys import Keys
from ingest.ledger import placement
from refstream import output as out
from refstream.console.ranges import RangeUsageError, parse_time
from refstream.runner import run_reading, settings_and_logging

T = TypeVar("T")
__all__ = ["RangeUsageError", "described", "parse_time", "render_replay", "replay"]


@click.command()
@click.option("--from-id", default=None, help="First stream id (ms-seq or ms), inclusive.")
@click.option("--to-id", default=None, help="Last stream id (ms-seq or ms), inclusive.")
@click.option("--since", default=None, help="From this time (inclusive): 2h, 30m, 7d ago, or an ISO datetime.")
@click.option("--until", default=None, help="To this time (exclusive): 2h, 30m, 7d ago, or an ISO datetime.")
@click.option("--partition", "partitions", type=int, multiple=True, help="Only this partition (repeatable).")
@click.option("--dry-run", is_flag=True, help="Count the entries in range and those already stored; change nothing.")
@out.json_option
def replay(
    from_id: str | None,
    to_id: str | None,
    since: str | None,
    until: str | None,
    partitions: tuple[int, ...],
    dry_run: bool,
) -> None:
    """Replay a stream range into Postgres; what is stored already counts nothing twice.

    Entries Redis no longer holds are read from the archive (REFSTREAM_ARCHIVE_URL). The
    consumer group is not touched (XRANGE, not XREADGROUP), so workers may keep running.
    The dry run replays in a transaction it rolls back: "new" is what a replay would store;
    "repeats" (a repeated lead or conversion) and "skipped" (an unknown code, an inactive
    link) produce no row by design. With several Postgres shards, each event is stored on
    its workspace's shard.
    """
    from workers.archive.store import open_store
    from workers.consumer.enrich import Enricher
    from workers.ops import replay as rp

    rng = rp.Range(
        from_id, to_id, parse_time(since) if since else None, parse_time(until) if until else None, partitions or None
    )
    settings = settings_and_logging()
    keys = Keys(settings.stream_prefix, settings.partitions)
    try:
        rng.bounds()
        rng.streams(keys, 1024)  # the partitions there were are checked against the layout in Redis
    except rp.RangeError as exc:
        raise RangeUsageError(str(exc)) from None

    async def go() -> dict[str, Any]:
        redis = connect_redis(settings)
        pool = await create_pg_pool(settings, min_size=1, max_size=2)
        shards = placement.Placement.over(settings, pool, max_size=2)  # each event on its workspace's shard
        source = rp.Source(  # Redis, and the archive for the rest; what a failover may lose: not yet
            redis,
            open_store(settings),
            keys.prefix,
            replicas=settings.ack_replicas,
            wait_ms=settings.ack_wait_ms,
        )
        enricher = Enricher(city_db=settings.city_db)  # bot verdicts, as the workers make them
        try:
            if dry_run:
                return (await rp.plan(source, shards, keys, rng, enricher=enricher)).to_dict()
            console = Console(stderr=True)
            columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=not console.is_terminal) as bar:
                task = bar.add_task("replay", total=None)
                result = await rp.replay(
                    source,
                    shards,
                    keys,
                    rng,
                    enricher=enricher,
                    batch_size=settings.batch_size,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
            return result.to_dict()
        finally:
            enricher.close()
            await source.aclose()
            await shards.close()
            await pool.close()
            await redis.aclose()

    try:
        result = run_reading(go())
    except rp.RangeError as exc:  # a partition past every count there was (the layout in Redis)
        raise RangeUsageError(str(exc)) from None
    if result["totals"]["entries"] == 0:
        raise RangeUsageError(f"the range {described(result['range'])} holds no entries")
    result["dry_run"] = dry_run
    if out.wants_json():
        out.print_json(result)
    else:
        render_replay(result, keys, out.console())


def described(rng: dict[str, str]) -> str:
    """A range as people read it: ``from 1712345678901-0 to the end``, not the largest id."""
    from workers.ops.replay_source import MAX_SEQ

    start = "the start" if rng["from"] == "0-0" else rng["from"]
    end = "the end" if rng["to"] == f"{MAX_SEQ}-{MAX_SEQ}" else rng["to"]
    return f"from {start} to {end}"


def render_replay(result: dict[str, Any], keys: Keys, console: Console) -> None:
    """Counts per partition and in total, the range in the title. How many entries came
    from the archive is a line below, not a column: nine columns do not fit 80."""
    totals = result["totals"]
    lines = ("archived", "refunds_not_restored")  # lines below the table: more columns do not fit 80
    fields = [f for f in totals if f not in lines]
    title = f"replay{' (dry run)' if result['dry_run'] else ''}: {described(result['range'])}"
    table = out.table(title, "p", *fields)
    for p, counts in result["partitions"].items():
        table.add_row(p, *(str(counts[f]) for f in fields))
    table.add_row("all", *(str(totals[f]) for f in fields), style="bold")
    console.print(out.streams_line(keys))
    console.print(table)
    if "archived" in totals:
        console.print(f"read from the archive (Redis no longer held them): {totals['archived']} of the entries")
    if totals.get("refunds_not_restored"):
        console.print(
            f"refunds not restored (their sale is not in Postgres, or they would pass it): "
            f"{totals['refunds_not_restored']}"
        )
