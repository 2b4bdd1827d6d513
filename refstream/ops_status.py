"""``refstream status`` and ``refstream dead``: what operators look at, and what they do
about dead letters. Tables (rich) for people, ``--json`` for scripts.

``refstream.cli`` registers these commands at its end, so this module imports it lazily
(inside the commands): a top-level import would be circular.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import click
from rich.console import Console
from rich.table import Table

from ingest.connections import connect_redis
from ingest.keys import Keys
from ingest.settings import Settings
from workers import dead as dead_mod
from workers import status as status_mod

EXIT_UNHEALTHY = 3
_LEFT = {
    "stream",
    "group",
    "consumer",
    "error",
    "subject",
    "value",
    "dead id",
    "entry id",
    "event id",
    "last delivered",
    "state",
    "reasons",
}


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    return f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for c in columns:
        table.add_column(c, justify="left" if c in _LEFT else "right")
    return table


def _render(snap: status_mod.Snapshot) -> None:
    console = Console()
    parts = _table("partitions", "stream", "length", "first entry age", "last entry age")
    groups = _table("groups", "stream", "group", "lag", "pending", "oldest pending", "last delivered")
    consumers = _table("consumers", "stream", "group", "consumer", "pending", "idle")
    for p in snap.partitions:
        parts.add_row(p.stream, str(p.length), _age(p.first_entry_age_s), _age(p.last_entry_age_s))
        for g in p.groups:
            lag = f"≥{g.lag}" if g.lag_capped else str(g.lag)
            groups.add_row(p.stream, g.name, lag, str(g.pending), _age(g.oldest_pending_age_s), g.last_delivered_id)
            for c in g.consumers:
                consumers.add_row(p.stream, g.name, c.name, str(c.pending), _age(c.idle_s))
    t, s = snap.throughput, snap.spool
    other = _table("dead letters · spool · throughput (last minute)", "subject", "value")
    other.add_row("dead letters", f"{snap.dead.count} (oldest {_age(snap.dead.oldest_age_s)})")
    where = f"{s.dir}" if s.exists else f"{s.dir} (no such directory)"
    other.add_row("spool", f"{s.files} files, {s.bytes} bytes in {where}" if s.dir else "no spool dir given")
    other.add_row("in", f"{'≥' if t.in_capped else ''}{t.in_events} events ({t.in_per_s:.1f}/s)")
    if t.out_events is None:
        other.add_row("out", f"unknown: Postgres could not be read ({snap.postgres_error})")
    else:
        other.add_row("out", f"{t.out_events} events ({t.out_per_s or 0:.1f}/s)")
    workers = _table("workers", "consumer", "state", "reasons", "blocked for", "last seen")
    for w in snap.workers:
        state = f"{w.state} (stale)" if w.stale else w.state
        workers.add_row(w.consumer, state, ", ".join(w.reasons) or "-", _age(w.blocked_for_s), _age(w.seen_s_ago))
    for table in (parts, groups, consumers, workers, other):
        console.print(table)
    if snap.healthy:
        console.print("[bold green]healthy[/]")
    for b in snap.breaches:
        console.print(f"[bold red]breach[/] {b.check}: {b.subject} = {b.value:g} > {b.limit:g}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@click.option("--max-lag", default=10_000, show_default=True, type=click.IntRange(min=0))
@click.option("--max-pending-age", default=300.0, show_default=True, type=click.FloatRange(min=0), help="Seconds.")
@click.option("--max-dead", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--spool-dir", envvar="REFSTREAM_SPOOL_DIR", default=None, help="[env: REFSTREAM_SPOOL_DIR]")
def status(as_json: bool, max_lag: int, max_pending_age: float, max_dead: int, spool_dir: str | None) -> None:
    """Streams, lag and pending per group and consumer, dead letters, the edge spool and
    the last minute's throughput, in one snapshot.

    \b
    Exit codes (usable as a health check):
      0  healthy: no threshold crossed
      3  a threshold crossed: a group's lag, its oldest pending entry's age, dead letters,
         or a worker blocked by an outage (Postgres or Redis; it waits, nothing is lost)
      1  Redis could not be read (without Postgres the snapshot says so and goes on)
    """
    from .cli import _print, _run

    thresholds = status_mod.Thresholds(max_lag, max_pending_age, max_dead)

    async def go(settings: Settings) -> status_mod.Snapshot:
        keys = Keys(settings.stream_prefix, settings.partitions)
        redis = connect_redis(settings)
        conn: asyncpg.Connection | None = None
        pg_error = None
        try:
            # during a Postgres outage the snapshot is what the operator needs most: without
            # Postgres, it says so and shows the rest (workers blocked, and why)
            try:
                conn = await asyncpg.connect(settings.database_url, timeout=5)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                pg_error = f"{type(exc).__name__}: {exc}"
            # the edge's spool on this machine: as configured, unless given
            return await status_mod.snapshot(
                redis, conn, keys, thresholds, spool_dir=spool_dir or settings.spool_dir, pg_error=pg_error
            )
        finally:
            if conn is not None:
                await asyncio.shield(conn.close())
            await redis.aclose()

    snap = _run(go)
    if as_json:
        _print(snap)
    else:
        _render(snap)
    if not snap.healthy:
        raise SystemExit(EXIT_UNHEALTHY)


@click.group()
def dead() -> None:
    """Dead letters: entries the workers set aside (undecodable, refused by Postgres, or
    delivered too often). List, inspect, requeue once the cause is fixed, or drop."""


def _redis_call(fn: Any) -> Any:
    """Run ``fn(redis, keys)`` with a Redis connection; JSON-ready result."""
    from .cli import _run

    async def go(settings: Settings) -> Any:
        redis = connect_redis(settings)
        try:
            return await fn(redis, Keys(settings.stream_prefix, settings.partitions))
        finally:
            await redis.aclose()

    try:
        return _run(go)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1), help="Oldest first.")
def dead_list(as_json: bool, limit: int) -> None:
    """Dead letters, oldest first: where each came from, why, and what it was."""
    from .cli import _print

    async def go(redis: Any, keys: Keys) -> list[dict[str, Any]]:
        return [letter.summary() async for letter in dead_mod.scan(redis, keys, limit=limit)]

    rows = _redis_call(go)
    if as_json:
        _print(rows)
        return
    cols = ("dead_id", "stream", "entry_id", "error", "deliveries", "type", "code", "event_id")
    table = _table("dead letters", *(c.replace("_", " ") for c in cols))
    for r in rows:
        table.add_row(*("-" if r[c] is None else str(r[c]) for c in cols))
    Console().print(table)


@dead.command("show")
@click.argument("dead_id")
def dead_show(dead_id: str) -> None:
    """One dead letter in full: its decoded envelope, or its raw bytes, escaped."""
    from .cli import _print

    async def go(redis: Any, keys: Keys) -> dict[str, Any] | None:
        letter = await dead_mod.get(redis, keys, dead_id)
        return letter.detail() if letter else None

    found = _redis_call(go)
    if found is None:
        raise click.ClickException(f"no dead letter {dead_id}")
    _print(found)


def _selection(
    dead_id: str | None, all_: bool, error_contains: str | None, code: str | None, stream: str | None
) -> tuple[list[str] | None, dead_mod.Filter | None]:
    filtered = any(v is not None for v in (error_contains, code, stream))
    if (dead_id is not None) + all_ + filtered != 1:
        raise click.UsageError("give exactly one of: an ID, --all, or filters (--error-contains, --code, --stream)")
    if dead_id is not None:
        return [dead_id], None
    return None, dead_mod.Filter(error_contains, code, stream)


def _selectors(fn: Any) -> Any:
    for opt in reversed(
        [
            click.argument("dead_id", required=False),
            click.option("--all", "all_", is_flag=True, help="Every dead letter."),
            click.option("--error-contains", default=None, help="Letters whose error contains TEXT."),
            click.option("--code", default=None, help="Letters whose event is for this link code."),
            click.option("--stream", default=None, help="Letters from this partition (its key or number)."),
        ]
    ):
        fn = opt(fn)
    return fn


def _stream_key(keys: Keys, flt: dead_mod.Filter | None) -> dead_mod.Filter | None:
    if flt is not None and flt.stream is not None and flt.stream.isdigit():
        if int(flt.stream) >= keys.partitions:
            raise ValueError(f"no partition {flt.stream} (there are {keys.partitions})")
        return dead_mod.Filter(flt.error_contains, flt.code, keys.stream(int(flt.stream)))
    return flt


@dead.command("requeue")
@_selectors
def dead_requeue(
    dead_id: str | None, all_: bool, error_contains: str | None, code: str | None, stream: str | None
) -> None:
    """Put dead letters back on their partitions (after fixing the cause), then delete them.

    Idempotent: what was requeued is gone from the dead stream. A crash between the two
    steps can add an event twice; the workers count it once (its event id)."""
    from .cli import _print

    ids, flt = _selection(dead_id, all_, error_contains, code, stream)

    async def go(redis: Any, keys: Keys) -> dict[str, Any]:
        out = await dead_mod.requeue(redis, keys, ids=ids, flt=_stream_key(keys, flt))
        return {"matched": out.matched, "requeued": out.done, "missing": out.missing, "skipped": out.skipped}

    _print(_redis_call(go))


@dead.command("drop")
@_selectors
@click.option("--reason", required=True, help="Why; kept with the dropped letter.")
def dead_drop(
    dead_id: str | None, all_: bool, error_contains: str | None, code: str | None, stream: str | None, reason: str
) -> None:
    """Set dead letters aside for good: moved, with the reason, to {prefix}:dead:dropped."""
    from .cli import _print

    ids, flt = _selection(dead_id, all_, error_contains, code, stream)

    async def go(redis: Any, keys: Keys) -> dict[str, Any]:
        out = await dead_mod.drop(redis, keys, reason, ids=ids, flt=_stream_key(keys, flt))
        return {"matched": out.matched, "dropped": out.done, "missing": out.missing, "to": dead_mod.dropped_key(keys)}

    _print(_redis_call(go))
