"""One snapshot of the pipeline's health: streams, groups, consumers, dead letters, the edge
spool and throughput, checked against thresholds.

Ages are measured against the Redis server's clock (``TIME``), the clock stream ids are
made from, so a skewed operator machine does not distort them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from redis.exceptions import ResponseError

from ingest.contract import layout
from ingest.contract.connections import Redis
from ingest.contract.keys import Keys, parse_id
from ingest.ledger import directory as directory_mod
from ingest.spool import store as spool_store
from workers.consumer import trim
from workers.consumer.trim import Memory
from workers.group import presence
from workers.group.presence import WorkerState

WINDOW_S = 60
COUNT_CAP = 100_000  # entries counted per partition (throughput, and lag on Redis < 7)
# a shard's figures: its workspaces' stored events of the window, without a moved-away
# workspace's frozen copy (its rows are counted where it is now), and its workspaces
_SHARD_SQL = """
SELECT (SELECT count(*) FROM events e WHERE e.processed_at >= now() - make_interval(secs => $1)
          AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = e.workspace_id AND w.moved_to IS NOT NULL))
         AS out_events,
       (SELECT count(*) FROM workspaces WHERE moved_to IS NULL) AS workspaces,
       (SELECT count(*) FROM workspaces WHERE moved_to IS NOT NULL) AS moved_away
"""
CONNECT_S = 5.0  # a shard that does not answer within this is shown down
PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclass(slots=True)
class Consumer:
    name: str
    pending: int
    idle_s: float


@dataclass(slots=True)
class Group:
    name: str
    lag: int  # entries not yet delivered to the group
    lag_capped: bool  # counted, and the count hit COUNT_CAP: the lag is at least ``lag``
    pending: int  # delivered, not acked
    oldest_pending_age_s: float | None  # age of the oldest pending entry (from its id)
    last_delivered_id: str
    consumers: list[Consumer] = field(default_factory=list)


@dataclass(slots=True)
class Partition:
    partition: int  # its number: the stream key is ``{prefix}:events:{partition}``
    stream: str
    length: int
    first_entry_age_s: float | None
    last_entry_age_s: float | None
    groups: list[Group] = field(default_factory=list)
    memory_bytes: int = 0  # MEMORY USAGE of the stream key (sampled)
    trim_held_by: str | None = None  # the group whose unacked entries keep the trim from its mark
    trim_held_entries: int = 0  # entries kept past the retention and memory marks for it
    trim_held_age_s: float | None = None  # age of the oldest entry that group still needs
    retiring: bool = False  # past the partition count the edges write: read until empty, then retired
    retired: bool = False  # its retired mark is there (``unread`` partitions: no append makes it again)


@dataclass(slots=True)
class Dead:
    count: int
    oldest_age_s: float | None


@dataclass(slots=True)
class Waiting:
    """The waiting rooms (``workers.consumer.waiting``): workspaces whose shard could not
    take their events yet, and how many events wait, the oldest for how long."""

    rooms: int
    events: int
    oldest_age_s: float | None


@dataclass(slots=True)
class Spool:
    dir: str | None
    exists: bool
    entries: int  # events waiting in the edge's spool database
    bytes: int  # their bytes (what REFSTREAM_SPOOL_MAX_BYTES caps)
    file_bytes: int = 0  # the database and its WAL on disk
    oldest_age_s: float | None = None
    free_bytes: int | None = None  # left on the spool's file system
    error: str | None = None  # the last failure an edge recorded there (disk full, ...), until it recovered


@dataclass(slots=True)
class Throughput:
    window_s: int
    in_events: int
    in_capped: bool
    in_per_s: float
    out_events: int | None  # None: Postgres could not be read
    out_per_s: float | None


@dataclass(slots=True)
class ShardFigures:
    """One shard's Postgres figures (``default`` is ``DATABASE_URL``'s database): the
    window's stored events and its workspaces, a moved-away workspace's old copy apart."""

    name: str
    reachable: bool
    error: str | None = None
    out_events: int | None = None
    workspaces: int | None = None
    moved_away: int | None = None  # old copies a move left until `workspace move --drop-old`


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_lag: int = 10_000
    max_pending_age_s: float = 300.0
    max_dead: int = 0
    memory_ratio: float = 0.8  # Redis used_memory / maxmemory


@dataclass(slots=True)
class Breach:
    check: str  # "lag", "pending_age", "dead", "blocked", "spool" (the edge's spool failing), "memory" or "unread"
    subject: str
    value: float
    limit: float


@dataclass(slots=True)
class Snapshot:
    """orjson serializes it as is; ``as_dict`` for anything else."""

    at_ms: int
    healthy: bool
    breaches: list[Breach]
    thresholds: Thresholds
    partitions: list[Partition]
    dead: Dead
    spool: Spool
    throughput: Throughput
    workers: list[WorkerState] = field(default_factory=list)
    postgres_error: str | None = None
    memory: Memory | None = None  # Redis used_memory against maxmemory
    # every other partition with a key in Redis (its stream, attempts or retired mark): a
    # retired one, or a stream no worker reads (a breach while it holds entries: nothing
    # trims them); ``partitions`` are those the workers read
    unread: list[Partition] = field(default_factory=list)
    shards: list[ShardFigures] = field(default_factory=list)  # each shard's Postgres figures
    waiting: Waiting | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _age(now_ms: int, raw_id: Any) -> float | None:
    return None if raw_id is None else max(0.0, (now_ms - parse_id(raw_id)[0]) / 1000)


async def _count_after(redis: Redis, stream: str, after: str, cap: int) -> tuple[int, bool]:
    """Entries with an id above ``after`` (exclusive), at most ``cap``."""
    found = await redis.xrange(stream, min=after, max="+", count=cap)
    return len(found), len(found) >= cap


async def group_lag(redis: Redis, stream: str, info: dict[str, Any], last_generated_id: Any) -> tuple[int, bool]:
    """(lag, capped). Redis 7 reports ``lag`` in XINFO GROUPS (nil when deletions make it
    unknowable); older servers (6.2 in the embedded tests) do not: count the entries after
    the group's last-delivered id instead."""
    if info.get("lag") is not None:
        return int(info["lag"]), False
    last = info["last-delivered-id"]
    if parse_id(last) >= parse_id(last_generated_id):
        return 0, False
    return await _count_after(redis, stream, "(" + _s(last), COUNT_CAP)


async def read_groups(redis: Redis, stream: str, last_generated_id: Any, now_ms: int) -> list[Group]:
    """Each consumer group of ``stream``: its lag, pending, oldest pending age and consumers
    (``refstream status``, and the console's pipeline page every 2 s)."""
    groups = []
    for g in await redis.xinfo_groups(stream):
        name = _s(g["name"])
        lag, capped = await group_lag(redis, stream, g, last_generated_id)
        oldest = None
        if g["pending"]:
            oldest = _age(now_ms, (await redis.xpending(stream, name))["min"])
        consumers = [
            Consumer(_s(c["name"]), int(c["pending"]), int(c["idle"]) / 1000)
            for c in await redis.xinfo_consumers(stream, name)
        ]
        groups.append(Group(name, lag, capped, int(g["pending"]), oldest, _s(g["last-delivered-id"]), consumers))
    return groups


async def _partition(
    redis: Redis, number: int, stream: str, now_ms: int, retention_s: int | None, budget: int
) -> Partition:
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" in str(exc):
            return Partition(number, stream, 0, None, None)  # nothing appended yet
        raise
    first, last = info.get("first-entry"), info.get("last-entry")
    part = Partition(
        number,
        stream,
        int(info["length"]),
        _age(now_ms, first[0]) if first else None,
        _age(now_ms, last[0]) if last else None,
        await read_groups(redis, stream, info["last-generated-id"], now_ms),
    )
    if retention_s is None:
        part.memory_bytes = await trim.memory_usage(redis, stream)
        return part
    hb = await trim.holdback(redis, stream, retention_s, budget, now_ms=now_ms, length=part.length)
    if hb is not None:
        part.memory_bytes = hb.memory_bytes
        part.trim_held_by, part.trim_held_entries = hb.held_by, hb.held_entries
        if hb.held_by is not None and hb.cut is not None and first:
            # the oldest entry it needs, not its need's id (0-1 for a group that read nothing)
            needed = max(hb.cut, parse_id(first[0]))
            part.trim_held_age_s = max(0.0, (now_ms - needed[0]) / 1000)
    return part


def spool_usage(spool_dir: str | None) -> Spool:
    """The edge's spool database in ``spool_dir`` (read-only, O(1): its totals row)."""
    if spool_dir is None:
        return Spool(None, False, 0, 0)
    u = spool_store.usage(Path(spool_dir))
    return Spool(spool_dir, u.exists, u.entries, u.bytes, u.file_bytes, u.oldest_age_s, u.free_bytes, u.error)


def _breaches(
    partitions: list[Partition],
    dead: Dead,
    t: Thresholds,
    workers: list[WorkerState],
    spool: Spool,
    memory: Memory | None,
    unread: list[Partition] | None = None,
) -> list[Breach]:
    out = []
    if spool.error is not None:
        out.append(Breach("spool", f"{spool.dir}: {spool.error}", spool.entries, 0))
    if memory is not None and memory.near_limit:
        out.append(Breach("memory", "redis used_memory / maxmemory", round(memory.ratio or 0, 3), t.memory_ratio))
    for w in workers:
        if w.state == "blocked" and not w.stale:
            out.append(Breach("blocked", f"worker {w.consumer}: {', '.join(w.reasons)}", w.blocked_for_s or 0.0, 0))
    for p in unread or ():
        if p.length:
            out.append(Breach("unread", f"{p.stream}: entries in a partition no worker reads", p.length, 0))
    for p in partitions:
        for g in p.groups:
            subject = f"{p.stream} {g.name}"
            if g.lag > t.max_lag:
                out.append(Breach("lag", subject, g.lag, t.max_lag))
            if g.oldest_pending_age_s is not None and g.oldest_pending_age_s > t.max_pending_age_s:
                out.append(Breach("pending_age", subject, g.oldest_pending_age_s, t.max_pending_age_s))
    if dead.count > t.max_dead:
        out.append(Breach("dead", "dead letters", dead.count, t.max_dead))
    return out


async def snapshot(
    redis: Redis,
    pg: asyncpg.Connection | dict[str, asyncpg.Connection | str] | None,
    keys: Keys,
    thresholds: Thresholds,
    *,
    spool_dir: str | None = None,
    pg_error: str | None = None,
    retention_s: int | None = None,
    max_bytes: int = 0,
    retiring: range = range(0),
) -> Snapshot:
    """Read everything once (Redis per partition, one Postgres count) and judge it. Without
    ``pg`` (Postgres unreachable: ``pg_error`` says why), everything but the out-throughput.
    With ``retention_s`` (and ``max_bytes``, the streams' memory budget) each partition says
    which group, if any, holds its trim back and by how many entries. ``keys`` has the
    partition count the edges write; the ``retiring`` ones (``ingest.contract.layout``) are
    shown after them until they are retired; every other partition that has a key in Redis
    (a retired one's mark, a stream nobody reads) is in ``unread``, with its length and groups."""
    secs, micros = await redis.time()
    now_ms = int(secs) * 1000 + int(micros) // 1000
    budget = max_bytes // keys.partitions if max_bytes else 0
    partitions = [
        await _partition(redis, p, stream, now_ms, retention_s, budget) for p, stream in enumerate(keys.streams)
    ]
    for p in retiring:
        partitions.append(await _partition(redis, p, keys.stream(p), now_ms, retention_s, budget))
        partitions[-1].retiring = True
    read = {p.partition for p in partitions}
    unread = []
    for p, (_, _, mark) in sorted((await layout.existing(redis, keys, range(layout.MOST))).items()):
        if p not in read:
            unread.append(await _partition(redis, p, keys.stream(p), now_ms, None, 0))
            unread[-1].retired = mark
    memory = await trim.redis_memory(redis, thresholds.memory_ratio)

    dead_len = await redis.xlen(keys.dead)
    oldest = await redis.xrange(keys.dead, count=1) if dead_len else []
    dead = Dead(dead_len, _age(now_ms, oldest[0][0]) if oldest else None)

    since = f"{now_ms - WINDOW_S * 1000}-0"
    in_events, in_capped = 0, False
    for stream in [p.stream for p in partitions]:
        n, capped = await _count_after(redis, stream, since, COUNT_CAP)
        in_events, in_capped = in_events + n, in_capped or capped
    # a sequential scan unless events has an index on processed_at (a BRIN index fits)
    shards = await _shards(pg, pg_error)
    up = [f for f in shards if f.reachable]
    out_events = sum(f.out_events or 0 for f in up) if up else None
    if pg_error is None and (down := [f for f in shards if not f.reachable]):
        pg_error = "; ".join(f"shard {f.name}: {f.error}" if len(shards) > 1 else str(f.error) for f in down)
    out_per_s = None if out_events is None else out_events / WINDOW_S
    throughput = Throughput(WINDOW_S, in_events, in_capped, in_events / WINDOW_S, out_events, out_per_s)

    workers = await presence.read(redis, keys, now_ms / 1000)
    spool = spool_usage(spool_dir)
    breaches = _breaches(partitions, dead, thresholds, workers, spool, memory, unread)
    waiting = await _waiting(redis, keys, now_ms)
    if waiting.oldest_age_s is not None and waiting.oldest_age_s > thresholds.max_pending_age_s:
        breaches.append(Breach("pending_age", "waiting rooms", waiting.oldest_age_s, thresholds.max_pending_age_s))
    return Snapshot(
        now_ms,
        not breaches,
        breaches,
        thresholds,
        partitions,
        dead,
        spool,
        throughput,
        workers,
        pg_error,
        memory,
        unread,
        shards,
        waiting,
    )


async def _waiting(redis: Redis, keys: Keys, now_ms: int) -> Waiting:
    rooms = [_s(m) for m in await redis.smembers(keys.waiting_rooms)]  # type: ignore[misc]
    events, oldest = 0, None
    for ws in rooms:
        room = keys.waiting_room(ws)
        events += await redis.xlen(room)
        first = await redis.xrange(room, count=1)
        if first:
            age = _age(now_ms, first[0][0])
            oldest = age if oldest is None or (age is not None and age > oldest) else oldest
    return Waiting(len(rooms), events, oldest)


async def _shards(
    pg: asyncpg.Connection | dict[str, asyncpg.Connection | str] | None, pg_error: str | None
) -> list[ShardFigures]:
    """Each shard's figures; one unreachable (or failing) is said, not raised."""
    if pg is None:  # not read (no connection, and why, if one was tried)
        return [ShardFigures("default", False, pg_error)] if pg_error else []
    found = []
    for name, conn in (pg if isinstance(pg, dict) else {"default": pg}).items():
        if isinstance(conn, str):
            found.append(ShardFigures(name, False, conn))
            continue
        try:
            row = await conn.fetchrow(_SHARD_SQL, float(WINDOW_S), timeout=10)
        except PG_ERRORS as exc:
            found.append(ShardFigures(name, False, f"{type(exc).__name__}: {exc}"))
            continue
        assert row is not None
        found.append(ShardFigures(name, True, None, int(row["out_events"]), row["workspaces"], row["moved_away"]))
    return found


async def connect_shards(url: str, secret_key: str | None) -> dict[str, asyncpg.Connection | str]:
    """A connection to every shard by name (``default``, ``url``'s, first), or why there is
    none: a shard that is down is said, never raised. Close them with ``close_shards``."""
    try:
        directory = await asyncpg.connect(url, timeout=CONNECT_S)
    except PG_ERRORS as exc:
        return {"default": f"{type(exc).__name__}: {exc}"}
    conns: dict[str, asyncpg.Connection | str] = {"default": directory}
    try:
        dsns = await directory_mod.shard_dsns(directory, secret_key)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        return conns  # a directory not migrated yet: one database
    except PG_ERRORS as exc:
        conns["default"] = f"{type(exc).__name__}: {exc}"
        await directory.close()
        return conns
    for name, dsn in dsns.items():
        try:
            conns[name] = await asyncpg.connect(dsn, timeout=CONNECT_S)
        except PG_ERRORS as exc:  # where, never who: no user or password
            where = urlsplit(dsn).netloc.rpartition("@")[2] + urlsplit(dsn).path
            conns[name] = f"postgres at {where}: {type(exc).__name__}: {exc}"
    return conns


async def close_shards(conns: dict[str, asyncpg.Connection | str]) -> None:
    for conn in conns.values():
        if not isinstance(conn, str):
            await conn.close()
