"""``refstream status`` and ``refstream dead``: what operators look at, and what they do
about dead letters. Tables (rich) for people, ``--json`` for scripts.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ingest.contract import layout
from ingest.contract.connections import connect_redis
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from ingest.ledger import placement
from refstream import output as out
from refstream.runner import run_command, shards_of
from workers.ops import dead as dead_mod
from workers.ops import status as status_mod

EXIT_UNHEALTHY = 3
_LEFT = (
    "shard",
    "group",
    "consumer",
    "error",
    "subject",
    "value",
    "field",
    "dead id",
    "entry id",
    "last delivered",
    "state",
    "reasons",
    "type",
    "code",
    "kept in",
    "skipped",
)


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    return f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _table(title: str, *columns: str) -> Table:
    return out.table(title, *columns, left=_LEFT)


def render_status(snap: status_mod.Snapshot, keys: Keys, console: Console) -> None:
    """The snapshot as tables. Partitions go by number (their stream key, long with its
    prefix, is said once in the title), so the tables fit 80 columns."""
    parts = _table("partitions", "p", "length", "memory", "first entry age", "last entry age")
    held = _table(
        "trim held back (entries kept past retention or memory budget)", "p", "group", "entries", "oldest needed"
    )
    groups = _table("groups", "p", "group", "lag", "pending", "oldest pending", "last delivered")
    consumers = _table("consumers", "p", "group", "consumer", "pending", "idle")
    for p in [*snap.partitions, *snap.unread]:  # then every other partition key in Redis
        number = f"{p.partition} (retiring)" if p.retiring else str(p.partition)
        if p in snap.unread:
            number = f"{p.partition} (retired)" if p.retired and not p.length else f"{p.partition} (unread)"
        parts.add_row(
            number, str(p.length), _bytes(p.memory_bytes), _age(p.first_entry_age_s), _age(p.last_entry_age_s)
        )
        if p.trim_held_by is not None:
            held.add_row(str(p.partition), out.cell(p.trim_held_by), str(p.trim_held_entries), _age(p.trim_held_age_s))
        for g in p.groups:
            lag = f"≥{g.lag}" if g.lag_capped else str(g.lag)
            groups.add_row(
                str(p.partition),
                out.cell(g.name),
                lag,
                str(g.pending),
                _age(g.oldest_pending_age_s),
                g.last_delivered_id,
            )
            for c in g.consumers:
                consumers.add_row(str(p.partition), out.cell(g.name), out.cell(c.name), str(c.pending), _age(c.idle_s))
    t, s = snap.throughput, snap.spool
    other = _table("dead letters · spool · throughput (last minute)", "subject", "value")
    other.add_row("dead letters", f"{snap.dead.count} (oldest {_age(snap.dead.oldest_age_s)})")
    if (m := snap.memory) is not None:
        limit = f"{_bytes(m.used)} of {_bytes(m.max)} ({(m.ratio or 0):.0%})" if m.max else f"{_bytes(m.used)}, no max"
        other.add_row("redis memory", limit + (" NEAR THE LIMIT: see what holds the trim" if m.near_limit else ""))
    other.add_row("spool", out.cell(_spool_cell(s)))
    other.add_row("in", f"{'≥' if t.in_capped else ''}{t.in_events} events ({t.in_per_s:.1f}/s)")
    if t.out_events is None:
        other.add_row("out", out.cell(f"unknown: Postgres could not be read ({snap.postgres_error})"))
    else:
        other.add_row("out", f"{t.out_events} events ({t.out_per_s or 0:.1f}/s)")
    workers = _table("workers", "consumer", "state", "reasons", "blocked for", "last seen")
    for w in snap.workers:
        state = f"{w.state} (stale)" if w.stale else w.state
        workers.add_row(
            out.cell(w.consumer),
            out.cell(state),
            out.cell(", ".join(w.reasons) or "-"),
            _age(w.blocked_for_s),
            _age(w.seen_s_ago),
        )
    console.print(out.streams_line(keys))
    tables = [parts, groups, consumers, workers, other]
    if len(snap.shards) > 1:  # Postgres on several shards: each one's figures
        tables.append(_shards_table(snap.shards))
    for table in tables:
        console.print(table)
        if table is parts and held.row_count:
            console.print(held)
    if snap.healthy:
        console.print("[bold green]healthy[/]")
    for b in snap.breaches:
        console.print(Text.assemble(("breach", "bold red"), f" {b.check}: {b.subject} = {b.value:g} > {b.limit:g}"))


def _shards_table(shards: list[status_mod.ShardFigures]) -> Table:
    t = _table("postgres shards (a moved workspace's old copy not counted)", "shard", "state", "out", "workspaces")
    for f in shards:
        if not f.reachable:
            t.add_row(out.cell(f.name), out.cell(f"DOWN: {f.error}"), "-", "-")
            continue
        moved = f" (+{f.moved_away} moved away)" if f.moved_away else ""
        t.add_row(out.cell(f.name), "up", f"{f.out_events} events", f"{f.workspaces}{moved}")
    return t


def _spool_cell(s: status_mod.Spool) -> str:
    if not s.dir:
        return "no spool dir given"
    if not s.exists:
        return f"{s.dir} (no such directory)"
    text = f"{s.entries} entries, {s.bytes} bytes in {s.dir}"
    if s.entries:
        text += f" (oldest {_age(s.oldest_age_s)})"
    if s.free_bytes is not None:
        text += f"; {s.file_bytes} bytes on disk, {s.free_bytes} free"
    if s.error:
        text += f"; FAILING: {s.error}"
    return text


@click.command()
@out.json_option
@click.option("--max-lag", default=10_000, show_default=True, type=click.IntRange(min=0))
@click.option("--max-pending-age", default=300.0, show_default=True, type=click.FloatRange(min=0), help="Seconds.")
@click.option("--max-dead", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--spool-dir", envvar="REFSTREAM_SPOOL_DIR", default=None, help="[env: REFSTREAM_SPOOL_DIR]")
def status(max_lag: int, max_pending_age: float, max_dead: int, spool_dir: str | None) -> None:
    """Streams, lag and pending per group and consumer, dead letters, the edge spool and
    the last minute's throughput, in one snapshot; with several Postgres shards, each
    one's figures (a shard that is down is shown down).

    \b
    Exit codes (usable as a health check):
      0  healthy: no threshold crossed
      3  a threshold crossed: a group's lag, its oldest pending entry's age, dead letters,
         a worker blocked by an outage (Postgres or Redis; it waits, nothing is lost), or
         the edge's spool failing (disk full, I/O error: its public routes answer 503), or
         Redis past REFSTREAM_MEMORY_WARN_RATIO of its maxmemory, or a partition's stream
         that no worker reads holding entries (listed under unread, with retired ones)
      1  Redis could not be read (without Postgres, or a shard of it, the snapshot says so
         and goes on)
    """

    async def go(settings: Settings) -> tuple[status_mod.Snapshot, Keys]:
        thresholds = status_mod.Thresholds(max_lag, max_pending_age, max_dead, settings.memory_warn_ratio)
        keys = Keys(settings.stream_prefix, settings.partitions)
        redis = connect_redis(settings)
        conns: dict[str, asyncpg.Connection | str] = {}
        try:
            lay = await layout.load(redis, keys, settings.partitions)  # refstream partitions set N
            keys.resize(lay.count)
            # during a Postgres outage the snapshot is what the operator needs most: without
            # Postgres (or one of its shards), it says so and shows the rest
            conns = await status_mod.connect_shards(settings.database_url, settings.secret_key)
            directory = conns["default"]
            # the edge's spool on this machine: as configured, unless given
            snap = await status_mod.snapshot(
                redis,
                conns if not isinstance(directory, str) else None,
                keys,
                thresholds,
                spool_dir=spool_dir or settings.spool_dir,
                pg_error=directory if isinstance(directory, str) else None,
                retention_s=settings.stream_retention_s,
                max_bytes=settings.stream_max_bytes,
                retiring=lay.retiring,
            )
            return snap, keys
        finally:
            await asyncio.shield(status_mod.close_shards(conns))
            await redis.aclose()

    snap, keys = run_command(go)
    if out.wants_json():
        out.print_json(snap)
    else:
        render_status(snap, keys, out.console())
    if not snap.healthy:
        raise SystemExit(EXIT_UNHEALTHY)


@click.group()
def dead() -> None:
    """Dead letters: entries the workers set aside (undecodable, refused by Postgres, or
    delivered too often). List, inspect, requeue once the cause is fixed, or drop."""


def _redis_call(fn: Any, shards: Any = None) -> tuple[Any, Keys]:
    """Run ``fn(redis, keys, writer)`` with a Redis connection and the level's writer
    (``ingest.contract.replicated``, for a write a delete follows): (its JSON-ready result,
    the keys); then ``shards(settings, result)``, which names each letter's shard, if given."""

    async def go(settings: Settings) -> tuple[Any, Keys]:
        keys = Keys(settings.stream_prefix, settings.partitions)
        redis = connect_redis(settings)
        writer = Replicated(redis, settings.ack_replicas, settings.ack_wait_ms)
        try:
            found = await fn(redis, keys, writer)
        finally:
            await writer.aclose()
            await redis.aclose()
        if shards is not None and found is not None:
            await shards(settings, found)
        return found, keys

    try:
        result: tuple[Any, Keys] = run_command(go)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return result


async def _name_shards(settings: Settings, rows: Any) -> None:
    """With several Postgres shards, each letter's ``shard``: where its workspace's rows are."""
    listed = rows if isinstance(rows, list) else [rows]
    where = await shards_of(settings, [r.get("workspace_id") for r in listed])
    for r in listed:
        if where is not None:
            r["shard"] = where.get(r.get("workspace_id") or "", placement.DEFAULT)
        if isinstance(rows, list):
            r.pop("workspace_id", None)


def _when(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def render_letters(rows: list[dict[str, Any]], keys: Keys, console: Console) -> None:
    """``dead list``: one row per letter; the event id and the rest are in ``dead show``."""
    sharded = any("shard" in r for r in rows)
    columns = ("dead id", "p", "entry id", "error", "tries", "type", "code", *(("shard",) if sharded else ()))
    table = _table("dead letters, oldest first", *columns)
    for r in rows:
        table.add_row(
            r["dead_id"],
            out.partition(keys, r["stream"]),
            out.cell(r["entry_id"]),
            out.cell(r["error"]),
            out.cell(r["deliveries"]),
            out.cell(r["type"]),
            out.cell(r["code"]),
            *((out.cell(r.get("shard")),) if sharded else ()),
        )
    if not rows:
        console.print("no dead letters")
        return
    console.print(out.streams_line(keys))
    console.print(table)


def render_letter(d: dict[str, Any], keys: Keys, console: Console) -> None:
    """``dead show``: every field of one letter, one per row."""
    e = d["envelope"]
    rows: list[tuple[str, Any]] = [
        ("partition", f"{out.partition(keys, d['stream'])} ({d['stream']})" if d["stream"] else None),
        ("entry id", d["entry_id"]),
        ("error", d["error"]),
        ("deliveries", d["deliveries"]),
        ("dead since", _when(d["at_ms"])),
        *((("shard", d["shard"]),) if "shard" in d else ()),
    ]
    if e is not None:
        rows += [
            ("event id", e["event_id"]),
            ("type", e["type"]),
            ("dialect", e["dialect"]),
            ("workspace id", e["workspace_id"]),
            ("received at", _when(e["received_at_ms"])),
            ("ip", e["ip"]),
            ("user agent", e["user_agent"]),
            ("payload", orjson.dumps(e["payload"]).decode()),
        ]
    else:
        rows += [("decode error", d["decode_error"]), ("raw", d["raw"]), ("raw bytes", d["raw_bytes"])]
        rows += [(f"raw {k}", v) for k, v in (d.get("raw_fields") or {}).items()]
    rows += [(f"field {k}", v) for k, v in d["other_fields"].items()]
    table = _table(f"dead letter {d['dead_id']}", "field", "value")
    for name, value in rows:
        table.add_row(out.cell(name), out.cell(value))
    console.print(table)


@dead.command("list")
@out.json_option
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1), help="Oldest first.")
def dead_list(limit: int) -> None:
    """Dead letters, oldest first: where each came from, why, and what it was."""

    async def go(redis: Any, keys: Keys, _: Replicated) -> list[dict[str, Any]]:
        return [
            letter.summary() | {"workspace_id": letter.envelope.workspace_id if letter.envelope else None}
            async for letter in dead_mod.scan(redis, keys, limit=limit)
        ]

    rows, keys = _redis_call(go, _name_shards)
    if out.wants_json():
        out.print_json(rows)
    else:
        render_letters(rows, keys, out.console())


@dead.command("show")
@click.argument("dead_id")
@out.json_option
def dead_show(dead_id: str) -> None:
    """One dead letter in full: its decoded envelope, or its raw bytes, escaped."""

    async def go(redis: Any, keys: Keys, _: Replicated) -> dict[str, Any] | None:
        letter = await dead_mod.get(redis, keys, dead_id)
        return letter.detail() if letter else None

    async def shard(settings: Settings, found: dict[str, Any]) -> None:
        e = found.get("envelope") or {}
        where = await shards_of(settings, [e.get("workspace_id")])
        if where is not None:
            found["shard"] = where.get(e.get("workspace_id") or "", placement.DEFAULT)

    found, keys = _redis_call(go, shard)
    if found is None:
        raise click.ClickException(f"no dead letter {dead_id}")
    if out.wants_json():
        out.print_json(found)
    else:
        render_letter(found, keys, out.console())


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
            out.json_option,
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


def _outcome(title: str, result: dict[str, Any]) -> None:
    """What a requeue or drop did: one row of counts (``skipped`` by reason)."""
    if out.wants_json():
        out.print_json(result)
        return
    table = _table(title, *({"to": "kept in"}.get(k, k) for k in result))
    table.add_row(
        *(
            out.cell(", ".join(f"{k} {n}" for k, n in v.items()) or "-") if isinstance(v, dict) else out.cell(v)
            for v in result.values()
        )
    )
    out.console().print(table)


@dead.command("requeue")
@_selectors
def dead_requeue(
    dead_id: str | None, all_: bool, error_contains: str | None, code: str | None, stream: str | None
) -> None:
    """Put dead letters back on their partitions (after fixing the cause), then delete them.

    Idempotent: what was requeued is gone from the dead stream. A crash between the two
    steps can add an event twice; the workers count it once (its event id)."""
    ids, flt = _selection(dead_id, all_, error_contains, code, stream)

    async def go(redis: Any, keys: Keys, writer: Replicated) -> dict[str, Any]:
        done = await dead_mod.requeue(redis, keys, ids=ids, flt=_stream_key(keys, flt), replicated=writer)
        return {"matched": done.matched, "requeued": done.done, "missing": done.missing, "skipped": done.skipped}

    _outcome("requeued to their partitions", _redis_call(go)[0])


@dead.command("drop")
@_selectors
@click.option("--reason", required=True, help="Why; kept with the dropped letter.")
def dead_drop(
    dead_id: str | None, all_: bool, error_contains: str | None, code: str | None, stream: str | None, reason: str
) -> None:
    """Set dead letters aside for good: moved, with the reason, to {prefix}:dead:dropped."""
    ids, flt = _selection(dead_id, all_, error_contains, code, stream)

    async def go(redis: Any, keys: Keys, writer: Replicated) -> dict[str, Any]:
        done = await dead_mod.drop(redis, keys, reason, ids=ids, flt=_stream_key(keys, flt), replicated=writer)
        to = dead_mod.dropped_key(keys)
        return {"matched": done.matched, "dropped": done.done, "missing": done.missing, "to": to}

    _outcome("dropped", _redis_call(go)[0])
