"""An erasure outside Postgres: Redis and the archive (``ingest.privacy.erasure`` does Postgres).

``sweep`` runs in the workers (an arq cron) and from ``refstream erase``; it finishes
every erasure the ledger holds as pending, all of them in one pass over each place:

- Postgres, again, behind the ledger's fence (``ingest.privacy.erasure_late.recheck``): an event
  row whose visitor, click or customer the ledger names and that still holds personal data
  (a batch stored it beside the one whose late lead taught the ledger that visitor).

- Redis, for the erasures it is pending for, and only what their people own there: what
  the ledger's entries and the people's rows name (``ingest.contract.erasure_index``), never
  a scan of every key or a read of every stream, so a sweep costs what the erased own, not
  what Redis holds. Their stream entries (each stored event's, read from its time in its
  stream; those the workers filed under one of their digests, appended late or stored as no
  row): one every consumer group has read and acked is deleted (XDEL: what a trim would do
  later); one a group has yet to read or ack is left to it (the workers store it scrubbed)
  and found again by the next sweep, and so is a partition whose workers have yet to read
  what was appended before the erasure. A dead letter of theirs is replaced by its scrubbed
  copy (the letters read once for each state of the pending erasures, then only those
  written since). The idempotency answers of their events (found by the index the edge
  files each record in) are rewritten in place, keeping their status and fingerprint, so a
  client's retry still gets its answer and appends nothing; the fingerprint cache's entries
  of their visitors (filed under each visitor's digest) are deleted.
- The archive, once Redis holds none of their unread entries: every segment from the hour
  of the person's first event on that holds one of their entries is rewritten, under the
  same name (same ids, same count, a new checksum), with the entries scrubbed. (A segment
  uploaded after the erasure was scrubbed by its archiver: ``workers.archive.erased``.)

What a copy the sweep scrubs teaches the ledger (a dead-lettered lead's click) is learned
as a worker would learn it, and the erasure is pending again. A place is marked done only
if nothing made the erasure pending again while the sweep ran (``erasures.generation``):
a worker that met a late copy of the person meanwhile has its copies found by the next.

Each erasure records the time each place was done (``erasures.redis_at``, ``archive_at``);
``status`` lists what is pending, and an archive past its ``archive_due`` is overdue.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import structlog
from redis.asyncio.cluster import RedisCluster

from ingest.contract import clicks, erasure, erasure_index, layout, wire
from ingest.contract.connections import Redis
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.events import Envelope, EventType, sale_routing_key
from ingest.contract.keys import GROUP, Keys, parse_id
from ingest.contract.wire import FIELD, FIELDS
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_copy, erasure_late
from workers.archive import erased
from workers.archive import read as archive_read
from workers.archive import segment as seg
from workers.archive.store import Store
from workers.group.primaries import Primaries

log = structlog.get_logger("workers.erasure")

_PAGE = 1000
_PENDING = pg_erasure.ROW + " WHERE archive_at IS NULL ORDER BY requested_at"


@dataclass(slots=True)
class SweepResult:
    erasures: int = 0  # pending when the sweep began
    rows_rechecked: int = 0  # event rows of theirs that still held personal data, scrubbed now
    entries_deleted: int = 0  # stream entries read and acked by every group: deleted
    # stream entries a group has yet to read or ack, and a partition's unread entries (below): next sweep
    entries_waiting: int = 0
    # partitions whose workers have yet to read what was appended before an erasure: the
    # person's entries may be among them (next sweep, once their rows say where)
    entries_unread: int = 0
    letters_replaced: int = 0
    answers_rewritten: int = 0
    fingerprints_deleted: int = 0
    clicks_uncached: int = 0  # click cache entries of the person's clicks met in the streams
    segments_read: int = 0
    segments_rewritten: int = 0
    redis_done: list[str] = field(default_factory=list)
    archive_done: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


async def status(pg: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every erasure with a place still pending, oldest first: ``refstream erase --status``."""
    return [pg_erasure.describe(r) for r in await pg.fetch(_PENDING)]


async def sweep(
    pg: asyncpg.Pool, redis: Redis, keys: Keys, store: Store | None, *, replicas: int = 0, wait_ms: int = 500
) -> SweepResult:
    """One pass over Redis, and where Redis is clear, over the archive (the module's doc).
    ``store`` None: no archive is configured, and there is none to rewrite. ``replicas``
    (``REFSTREAM_ACK_DURABILITY=replicas:N``): Redis is marked done only once N replicas
    hold what the pass deleted and rewrote there (``_fenced``)."""
    result = SweepResult()
    rows = await pg.fetch(_PENDING)
    rows = [r for r in rows if r["postgres_at"] is not None]  # the ledger and Postgres first
    result.erasures = len(rows)
    if not rows:
        return result
    async with pg.acquire() as conn:
        key = await erasure.salt(conn)
    # the ledger's copy outside Postgres, as it stands now (what writers taught it since):
    # before Redis can be marked done, and before the fence that replicates it
    await erasure_copy.keep(pg, redis, keys, [r["id"] for r in rows])
    check = _Check(pg, key)
    since = [r["since"] for r in rows if r["since"] is not None]
    # Postgres first: a row a batch stored beside the one that taught the ledger its visitor
    result.rows_rechecked = await _recheck(pg, key, rows)
    high = (await layout.load(redis, keys, keys.partitions)).high
    # Redis, for the erasures it is pending for: what their people own there alone, found by
    # the ledger's entries and their rows (never a scan of every key or every entry)
    redis_pending = [r for r in rows if r["redis_at"] is None]
    if redis_pending:
        theirs = await _theirs(pg, key, keys, redis_pending)
        streams = await _streams(redis, keys, high)
        await _entries(redis, keys, streams, theirs, check, result)
        for s in (keys.dead, keys.dead + ":dropped"):
            await _letters(redis, keys, s, streams, redis_pending, check, result)
        await _answers(redis, keys, theirs, check, result)
        await _fingerprints(redis, keys, theirs, check, result)
        result.entries_unread = _unread(streams, redis_pending)
        result.entries_waiting += result.entries_unread  # at least an entry waits in each
    if result.entries_waiting:
        log.info("erasure.redis_waiting", entries=result.entries_waiting, partitions_unread=result.entries_unread)
        return result
    if (short := await _fenced(redis, keys, high, replicas, wait_ms)) is not None:
        log.info("erasure.redis_unreplicated", why=short)  # a failover could bring back what it removed
        return result
    if redis_pending:
        result.redis_done = await _done(pg, "redis_at", redis_pending)
    if store is not None and since:
        await _archive(store, keys, high, min(since), check, result)
    result.archive_done = await _done(pg, "archive_at", rows)
    log.info("erasure.sweep", **{k: v for k, v in result.to_dict().items() if isinstance(v, int)})
    return result


async def _recheck(pg: asyncpg.Pool, key: bytes, rows: list[asyncpg.Record]) -> int:
    """Postgres again, behind the fence (``erasure_late.recheck``): each workspace with an
    erasure whose generation it has not re-checked yet, from that workspace's earliest, and
    only its rows. What made an erasure pending again (a writer that learned something: its
    generation moved) is what a re-check looks for; an erasure pending for its archive alone
    is not re-read every sweep. Each erasure's generation read before the fence is the one
    re-checked: a lesson learned meanwhile moves it on, and the next sweep looks again."""
    due: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        if r["since"] is not None and r["rechecked"] != r["generation"]:
            due.setdefault(str(r["workspace_id"]), []).append(r)
    scrubbed = 0
    for ws, mine in sorted(due.items()):
        scrubbed += await erasure_late.recheck(pg, key, ws, min(r["since"] for r in mine))
        await pg.execute(
            "UPDATE erasures e SET rechecked = x.generation FROM unnest($1::uuid[], $2::bigint[]) AS x(id, generation) "
            "WHERE e.id = x.id",
            [r["id"] for r in mine],
            [r["generation"] for r in mine],
        )
    return scrubbed


async def _done(pg: asyncpg.Pool, place: str, rows: list[asyncpg.Record]) -> list[str]:
    """Mark ``place`` done for the erasures of ``rows``, each only if nothing made it pending
    again since the sweep read it (a worker that met a late copy of theirs, a second erasure,
    this sweep's own lesson: ``erasure.learn``); those the next sweep takes again."""
    done = await pg.fetch(
        f"UPDATE erasures e SET {place} = now() FROM unnest($1::uuid[], $2::bigint[]) AS x(id, generation) "
        "WHERE e.id = x.id AND e.generation = x.generation RETURNING e.id",
        [r["id"] for r in rows],
        [r["generation"] for r in rows],
    )
    return sorted(str(r["id"]) for r in done)


async def _fenced(redis: Redis, keys: Keys, high: int, replicas: int, wait_ms: int) -> str | None:
    """None once ``replicas`` replicas hold every write this sweep made in Redis; else why
    not. A fence key written then a WAIT, on one connection: replication is in order, so a
    replica that has the fence has every write made before it, by any connection. (Without
    this, a Sentinel failover right after a sweep promoted a replica that lacked its XDELs
    and answer rewrites, and the erasure, marked done, left the person in Redis: the
    generative test's seed 1029314941.) On a Redis Cluster, one fence per partition's slot
    (the entries and answers a sweep touches carry its tag) and one for the dead letters."""
    if not replicas:
        return None
    keys_and_fences = [(keys.stream(p), f"{keys.prefix}:erasure:fence:{{{p}}}") for p in range(high)]
    keys_and_fences.append((keys.dead, f"{{{keys.dead}}}:erasure:fence"))
    if not isinstance(redis, RedisCluster):
        keys_and_fences = keys_and_fences[:1]
    primaries = Primaries(redis) if isinstance(redis, RedisCluster) else None
    try:
        for key, fence in keys_and_fences:

            def fenced(pipe: Any, fence: str = fence) -> None:
                pipe.set(fence, b"1", px=60_000)
                pipe.execute_command("WAIT", replicas, wait_ms)

            if primaries is not None:
                replies = await primaries.send(key, fenced)
            else:
                pipe: Any = redis.pipeline(transaction=False)
                fenced(pipe)
                replies = await pipe.execute(raise_on_error=False)
            if error := next((r for r in replies if isinstance(r, Exception)), None):
                return f"{type(error).__name__}: {error}"
            if int(replies[-1]) < replicas:
                return f"{replies[-1]} of {replicas} replicas within {wait_ms} ms ({key})"
    finally:
        if primaries is not None:
            await primaries.aclose()
    return None


class _Check:
    """Which envelopes the ledger names and that still hold personal data: a page at a time."""

    def __init__(self, pg: asyncpg.Pool, key: bytes) -> None:
        self.pg = pg
        self.key = key

    async def personal(self, envelopes: list[Envelope]) -> set[int]:
        """Indexes of ``envelopes`` to scrub."""
        if not envelopes:
            return set()
        async with self.pg.acquire() as conn:
            ledger = await erasure.Ledger.read(conn, envelopes)
            hits = {
                i
                for i, e in enumerate(envelopes)
                if ledger.names(e) and erasure.scrub(self.key, e, ledger.workspace(e)) != e
            }
            # what a copy the sweep scrubs teaches (a dead-lettered or archived lead's click):
            # the ledger learns it as a worker storing it would have, and the erasure is
            # pending again where something joined
            await erasure.learn(
                conn, self.key, [(envelopes[i], ledger.workspace(envelopes[i])) for i in sorted(hits)], met=False
            )
        return hits

    def scrub(self, e: Envelope) -> Envelope:
        return erasure.scrub(self.key, e)


@dataclass(slots=True)
class _Event:
    """One of a person's stored events: where its entry and its idempotency record may be."""

    event_id: uuid.UUID
    hint: int | None  # the partition its routing key gives under the current count (None: not known)
    dedupe: str | None  # its idempotency key's digest, from its payload (a record an older edge did not file)

    @property
    def ms(self) -> int:
        return erasure_index.event_ms(self.event_id)


@dataclass(slots=True)
class _Theirs:
    """What the pending erasures of one workspace reach: their ledger's entries (kind ->
    digests) and their people's stored events (found under the pseudonyms those make)."""

    workspace_id: str
    digests: dict[str, list[bytes]]
    events: list[_Event]


# an erasure's own entries, in its own workspace
_LEDGER_OF = """
SELECT i.digest, i.kind FROM erased_ids i JOIN erasures e ON e.id = i.erasure_id AND i.workspace_id = e.workspace_id
WHERE e.id = ANY($1::uuid[])
"""
# the person's events, by index (events_workspace_customer, events_workspace_visitor_known,
# the key): their rows name them by the pseudonyms their ledger's digests make
_THEIR_EVENTS = """
SELECT e.event_id, e.click_id, l.code, e.payload->>'dedupe' AS dedupe
FROM events e LEFT JOIN links l ON l.id = e.link_id
WHERE e.workspace_id = $1 AND e.event_id >= $4 AND e.event_id = ANY(ARRAY(
    SELECT event_id FROM events WHERE workspace_id = $1 AND customer_external_id = ANY($2::text[]) AND event_id >= $4
    UNION SELECT event_id FROM events WHERE workspace_id = $1 AND visitor_id = ANY($3::text[]) AND event_id >= $4
))
"""
_THEIR_CLICKS = """
SELECT e.event_id, e.click_id, l.code, e.payload->>'dedupe' AS dedupe
FROM events e LEFT JOIN links l ON l.id = e.link_id
WHERE e.event_id = ANY($2::uuid[]) AND e.workspace_id = $1
"""
_THEIR_SALES = """
SELECT event_id, invoice_id FROM sales WHERE workspace_id = $1 AND customer_external_id = ANY($2::text[])
"""


async def _theirs(pg: asyncpg.Pool, key: bytes, keys: Keys, rows: list[asyncpg.Record]) -> list[_Theirs]:
    """Per workspace, what its pending erasures reach (``_Theirs``)."""
    spaces: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        spaces.setdefault(str(r["workspace_id"]), []).append(r)
    out = []
    async with pg.acquire() as conn:
        for ws, mine in sorted(spaces.items()):
            digests: dict[str, list[bytes]] = {}
            for d in await conn.fetch(_LEDGER_OF, [r["id"] for r in mine]):
                digests.setdefault(d["kind"], []).append(bytes(d["digest"]))
            since = [r["since"] for r in mine if r["since"] is not None]
            floor = pg_erasure.uuid_floor(min(since) - timedelta(days=31)) if since else uuid.UUID(int=0)
            aliases = {kind: [erasure.pseudonym_of(key, d) for d in ds] for kind, ds in digests.items()}
            found = await conn.fetch(_THEIR_EVENTS, ws, aliases.get(EXTERNAL, []), aliases.get(VISITOR, []), floor)
            named = {r["click_id"] for r in found if r["click_id"] is not None} - {r["event_id"] for r in found}
            if named:
                found = [*found, *await conn.fetch(_THEIR_CLICKS, ws, sorted(named))]
            events = {r["event_id"]: _event(keys, r["event_id"], r["code"], r["dedupe"]) for r in found}
            for r in await conn.fetch(_THEIR_SALES, ws, aliases.get(EXTERNAL, [])):
                routing = sale_routing_key(ws, "invoice", r["invoice_id"]) if r["invoice_id"] else None
                events.setdefault(r["event_id"], _event(keys, r["event_id"], routing, None))
            out.append(_Theirs(ws, digests, [events[k] for k in sorted(events)]))
    return out


def _event(keys: Keys, event_id: uuid.UUID, routing: str | None, dedupe: str | None) -> _Event:
    digest = dedupe.split(":")[1] if isinstance(dedupe, str) and dedupe.startswith("idem:") else None
    return _Event(event_id, keys.partition_for(routing) if routing else None, digest)


@dataclass(slots=True)
class _Stream:
    """A partition's stream as the sweep found it: its groups, its first entry, how far its
    workers have read, and the oldest entry they hold pending (None: none)."""

    partition: int
    name: str
    groups: list[dict[str, Any]]
    first_ms: int | None  # None: no entry
    last_id: tuple[int, int]
    workers_read: tuple[int, int] | None  # None: no workers' group
    workers_pending: tuple[int, int] | None


async def _streams(redis: Redis, keys: Keys, high: int) -> list[_Stream]:
    """Each partition's stream, a few commands each."""
    out = []
    for p in range(high):
        name = keys.stream(p)
        try:
            info = await redis.xinfo_stream(name)
            groups = await redis.xinfo_groups(name)
        except Exception as exc:  # no such stream: nothing in it
            if "no such key" in str(exc).lower():
                continue
            raise
        first = info.get("first-entry")
        mine = next((g for g in groups if _text(g["name"]) == GROUP), None)
        pending = None
        if mine is not None and int(mine.get("pending") or 0):
            summary = await redis.xpending(name, GROUP)
            pending = parse_id(summary["min"]) if summary and summary.get("min") else None
        out.append(
            _Stream(
                p,
                name,
                groups,
                parse_id(first[0])[0] if first else None,
                parse_id(info["last-generated-id"]),
                parse_id(mine["last-delivered-id"]) if mine is not None else None,
                pending,
            )
        )
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _unread(streams: list[_Stream], rows: list[asyncpg.Record]) -> int:
    """The partitions whose workers have yet to read (or to ack) an entry appended before
    the last of ``rows`` was requested (a second of clock between Postgres and Redis
    aside): one of the person's may be among them, and no row says so yet. An entry
    appended after the erasure is scrubbed by the workers, who then make it pending again."""
    before = (int(max(r["requested_at"] for r in rows).timestamp() * 1000) + 1000, 0)
    unread = 0
    for s in streams:
        if s.workers_read is None:
            continue  # no workers read this stream: nothing of it is stored, nothing waits on them
        if s.workers_read < min(before, s.last_id) or (s.workers_pending is not None and s.workers_pending < before):
            unread += 1
    return unread


async def _entries(
    redis: Redis, keys: Keys, streams: list[_Stream], theirs: list[_Theirs], check: _Check, result: SweepResult
) -> None:
    """The people's entries: each stored event's found by its time in its stream (its own
    partition first), and those the workers filed under one of their digests
    (``Keys.entries_of``); each that still holds their data is deleted once every group has
    read and acked it, else left to the next sweep."""
    by_partition = {s.partition: s for s in streams}
    found: dict[tuple[int, bytes], dict[bytes, bytes]] = {}
    for t in theirs:
        for e in t.events:
            order = sorted(by_partition, key=lambda p: (p != e.hint, p))
            for p in order:
                s = by_partition[p]
                if s.first_ms is None or e.ms + erasure_index.NEAR_AFTER_MS < s.first_ms:
                    continue  # trimmed (or deleted) by now
                if (hit := await _by_time(redis, s.name, e)) is not None:
                    found[(p, hit[0])] = hit[1]
                    break
        for d in (d for ds in t.digests.values() for d in ds):
            index = keys.entries_of(t.workspace_id, d)
            for member in await redis.smembers(index):  # type: ignore[misc]
                where = erasure_index.parse_entry(member)
                if where is None or where[0] not in by_partition:
                    await redis.srem(index, member)  # type: ignore[misc]
                    continue
                page = await redis.xrange(by_partition[where[0]].name, min=where[1], max=where[1], count=1)
                if not page:  # deleted or trimmed: the index keeps it no longer
                    await redis.srem(index, member)  # type: ignore[misc]
                    continue
                found[(where[0], _bytes(page[0][0]))] = page[0][1]
    await _handle(redis, keys, by_partition, found, check, result)


async def _by_time(redis: Redis, stream: str, e: _Event) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The entry of ``e`` in ``stream``, read from its event's time (an entry follows its
    event within moments), then from a moment before it: None if it is in neither span."""
    for low, high in (
        (e.ms, e.ms + erasure_index.NEAR_AFTER_MS),
        (e.ms - erasure_index.NEAR_BEFORE_MS, e.ms - 1),
    ):
        start = f"{low}-0"
        while True:
            page = await redis.xrange(stream, min=start, max=f"{high}-{2**63 - 1}", count=_NEAR_PAGE)
            for sid, fields in page:
                if _event_id(fields) == e.event_id:
                    return _bytes(sid), fields
            if len(page) < _NEAR_PAGE:
                break
            start = "(" + _bytes(page[-1][0]).decode()
    return None


_NEAR_PAGE = 100


def _bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _event_id(fields: dict[bytes, bytes]) -> uuid.UUID | None:
    try:
        return wire.from_entry(fields).event_id
    except wire.EnvelopeError:
        return None


async def _handle(
    redis: Redis,
    keys: Keys,
    streams: dict[int, _Stream],
    found: dict[tuple[int, bytes], dict[bytes, bytes]],
    check: _Check,
    result: SweepResult,
) -> None:
    """Of the entries ``found``, those the ledger names that still hold personal data: their
    click cache entries and rate windows go, and each is deleted once every group has read
    and acked it, else counted waiting."""
    where = sorted(found)
    rows: list[tuple[Any, dict[bytes, bytes] | None]] = [(sid, found[(p, sid)]) for p, sid in where]
    decoded = erased.decoded(rows)
    hits = await check.personal([e for _, e in decoded])
    met = [decoded[j] for j in sorted(hits)]
    await _uncache(redis, keys, [e for _, e in met], result)
    for i, _ in met:
        p, sid = where[i]
        s = streams[p]
        if await _read_by_all(redis, s.name, s.groups, sid):
            result.entries_deleted += await redis.xdel(s.name, sid)
        else:
            result.entries_waiting += 1


async def _uncache(redis: Redis, keys: Keys, met: list[Envelope], result: SweepResult) -> None:
    """The click cache's entries of the clicks these copies are or name (an entry keeps the
    visitor for the cookie window), and the rate limiter's windows of their addresses:
    deleted, as the erasure deletes those it knows at once. A click (and its address) the
    erasure could not know then, because the lead that names it came later, is met here."""
    ids = set()
    for ip in sorted({e.ip for e in met if e.ip}):
        for limiter in keys.LIMITERS:
            await redis.delete(keys.ratelimit(limiter, ip))
    for e in met:
        if e.type is EventType.CLICK:
            ids.add(clicks.mint(e.event_id))
        if isinstance(c := e.payload.get("click_id"), str) and clicks.parse(c) is not None:
            ids.add(c)
    for c in sorted(ids):
        result.clicks_uncached += await redis.delete(keys.click(c))


async def _read_by_all(redis: Redis, stream: str, groups: list[dict[str, Any]], sid: Any) -> bool:
    """Every group of ``stream`` has read ``sid`` and acked it (none: nobody will read it)."""
    if not groups:
        return False
    at = parse_id(sid)
    for g in groups:
        if parse_id(g["last-delivered-id"]) < at:
            return False
        if await redis.xpending_range(stream, g["name"], min=sid, max=sid, count=1):
            return False
    return True


async def _letters(
    redis: Redis,
    keys: Keys,
    stream: str,
    streams: list[_Stream],
    rows: list[asyncpg.Record],
    check: _Check,
    result: SweepResult,
) -> None:
    """Dead letters are read by operators, not groups: each of the person's is replaced by its
    scrubbed copy (the letter's own fields kept) at the end of the stream, and the entry it
    was made of goes like any other of theirs. No row names a letter: the letters are read
    once for each state of the pending erasures (a new one, one that learned something:
    ``erasures.generation``), and between them only those written since (a cursor kept in
    Redis): what changed, never the whole stream every sweep."""
    state = hashlib.sha256(" ".join(sorted(f"{r['id']}:{r['generation']}" for r in rows)).encode()).hexdigest()[:32]
    cursor = f"{keys.prefix}:erasure:read:{stream}"
    held = await redis.get(cursor)
    token, _, last = (_text(held) if held is not None else "").partition(" ")
    if token != state:
        last = ""  # the erasures changed since: every letter again, once
    start = "(" + last if last else "-"
    originals: dict[tuple[int, bytes], dict[bytes, bytes]] = {}
    by_name = {s.name: s for s in streams}
    while True:
        page = await redis.xrange(stream, min=start, max="+", count=_PAGE)
        if not page:
            break
        decoded = erased.decoded(page)
        hits = await check.personal([e for _, e in decoded])
        for j in sorted(hits):
            i, e = decoded[j]
            sid, fields = page[i]
            copy: dict[Any, Any] = {k: v for k, v in fields.items() if k not in FIELDS and k != FIELD}
            if FIELD in fields:
                copy[FIELD] = wire.to_blob(check.scrub(e))
            else:
                copy.update(erased.fields_of(check.scrub(e)))
            await redis.xadd(stream, copy)
            await redis.xdel(stream, sid)
            result.letters_replaced += 1
            # the entry the letter was made of, where it still is
            origin, at = fields.get(b"stream"), fields.get(b"id")
            if origin is not None and at is not None and (s := by_name.get(_text(origin))) is not None:
                for osid, ofields in await redis.xrange(s.name, min=_text(at), max=_text(at), count=1):
                    originals[(s.partition, _bytes(osid))] = ofields
        last = _bytes(page[-1][0]).decode()
        start = "(" + last
        if len(page) < _PAGE:
            break
    if last:
        await redis.set(cursor, f"{state} {last}", ex=30 * 86400)
    if originals:
        await _handle(redis, keys, {s.partition: s for s in streams}, originals, check, result)


async def _answers(redis: Redis, keys: Keys, theirs: list[_Theirs], check: _Check, result: SweepResult) -> None:
    """The idempotency answers (``ingest.edge.idempotency.Answer``: fingerprint, status, JSON
    body) of the people's own events, found by the index the edge files each record in
    (``Keys.answers``: by its event's time and id) or, for a record an older edge did not
    file, by the key's digest their stored event carries; each rewritten without them where
    unchanged since, in its own workspace's terms."""
    for t in theirs:
        if not t.events:
            continue
        records: set[str] = set()
        index = keys.answers(t.workspace_id)
        oldest = await redis.zrange(index, 0, 0, withscores=True)
        floor = int(oldest[0][1]) if oldest else None
        for e in t.events:
            filed = []
            if floor is not None and e.ms >= floor:
                for member in await redis.zrangebyscore(index, e.ms, e.ms):
                    if (parsed := erasure_index.parse_answer(member)) is not None and parsed[0] == e.event_id.hex:
                        _, p, digest, named = parsed
                        filed.append(keys.idempotent(digest, p, t.workspace_id if named else None))
            if not filed and e.dedupe is not None and e.hint is not None:  # an older edge's record
                filed += [keys.idempotent(e.dedupe, e.hint, t.workspace_id), keys.idempotent(e.dedupe, e.hint)]
            records.update(filed)
        for name in sorted(records):
            raw = await redis.get(name)
            if raw is None or len(raw) < 35 or raw[35:36] not in (b"{", b"["):
                continue  # gone, a reservation, or an answer sealed for a management write (never in clear)
            try:
                body = orjson.loads(raw[35:])
            except orjson.JSONDecodeError:
                continue
            new = await _redacted(body, check, [t.workspace_id])
            if new is None:
                continue
            changed = raw[:35] + orjson.dumps(new)  # as deep as the answer orjson wrote at the edge
            # only if unchanged since it was read; the record keeps its expiry
            if await redis.eval(_SWAP, 1, name, raw, changed):  # type: ignore[misc]
                result.answers_rewritten += 1


async def _fingerprints(redis: Redis, keys: Keys, theirs: list[_Theirs], check: _Check, result: SweepResult) -> None:
    """Affixo's fingerprint cache (``ingest.edge.routes.affixo``: a fingerprint's first
    visitor, for 90 days) names an erased visitor: the entry goes (only if unchanged since
    it was read), so no later click of that fingerprint is handed the erased visitor. Found
    by the index the edge files each entry in, under its visitor's digest
    (``Keys.fingerprints_of``): the people's own entries, never every entry."""
    for t in theirs:
        for d in t.digests.get(VISITOR, []):
            index = keys.fingerprints_of(t.workspace_id, d)
            for member in await redis.smembers(index):  # type: ignore[misc]
                name = keys.fingerprint(t.workspace_id, _text(member))
                value = await redis.get(name)
                if isinstance(value, bytes):
                    visitor = value.decode(errors="replace")
                    mine = not erasure.is_pseudonym(visitor) and erasure.digest(check.key, VISITOR, visitor) == d
                    if mine and await redis.eval(_DROP, 1, name, value):  # type: ignore[misc,arg-type]
                        result.fingerprints_deleted += 1
                    elif mine:
                        continue  # it changed since it was read: the next sweep looks again
                await redis.srem(index, member)  # type: ignore[misc]


_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""


async def _redacted(body: Any, check: _Check, spaces: list[str]) -> Any:
    """``body`` with the objects that name an erased person scrubbed; None: it names none.
    Every probe is asked in ``spaces`` alone (the record's own workspace, or for a record
    that names none, each with an erasure): another workspace's erasure of the same
    client-chosen visitor or click id is another person's."""
    strings = sorted(set(_strings(body)))
    if not strings or not spaces:
        return None
    key = check.key
    probes: dict[tuple[bytes, str], tuple[str, str | None]] = {}  # (digest, workspace) -> (the string, its pseudonym)
    for s in strings:
        for ws in spaces:
            probes[(erasure.digest(key, EXTERNAL, s, ws), ws)] = (s, erasure.pseudonym(key, EXTERNAL, s, ws))
            probes[(erasure.digest(key, VISITOR, s), ws)] = (s, erasure.pseudonym(key, VISITOR, s))
            if (click := clicks.parse(s)) is not None:
                probes[(erasure.digest(key, EVENT, click.hex), ws)] = (s, s)  # an id, not personal: kept
    async with check.pg.acquire() as conn:
        found = await conn.fetch(
            "SELECT i.digest, i.workspace_id::text AS ws FROM erased_ids i"
            " JOIN unnest($1::bytea[], $2::uuid[]) AS a (d, ws) ON i.digest = a.d AND i.workspace_id = a.ws",
            [d for d, _ in probes],
            [uuid.UUID(ws) for _, ws in probes],
        )
    # the person's ids (a click id the ledger names is an id, not personal: it stays, and
    # does not make the answer theirs)
    named = {s: alias for s, alias in (probes[(bytes(r["digest"]), r["ws"])] for r in found) if alias and alias != s}
    if not named:
        return None
    # by identity: the objects that name them in an id field, their customer object; never
    # a string of the answer's equal to one of theirs elsewhere (an invoice id)
    new = erasure.redact_person(body, named)
    return None if new == body else new


def _strings(doc: Any) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in _strings(v)]
    return []


async def _archive(store: Store, keys: Keys, high: int, since: datetime, check: _Check, result: SweepResult) -> None:
    start = (int(since.timestamp() * 1000) - 3_600_000, 0)  # the hour before: appended after received
    end = (2**63 - 1, 2**63 - 1)
    for p in range(high):
        for name in await archive_read.segments(store, keys.prefix, p, start, end):
            data = await store.get(name)
            manifest, entries = await asyncio.to_thread(seg.read, data)
            result.segments_read += 1
            rows: list[erased.Row] = [
                (e.id, e.fields if e.fields is not None else {FIELD: e.envelope or b""}) for e in entries
            ]
            async with check.pg.acquire() as conn:
                rows, n = await erased.scrubbed(conn, rows, met=False)
            if not n:
                continue
            again, body = await asyncio.to_thread(seg.build, manifest.partition, rows)
            await store.put(seg.name(keys.prefix, p, again.first_id, again.last_id), body)
            result.segments_rewritten += 1
