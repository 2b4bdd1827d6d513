"""An erasure outside Postgres: Redis and the archive (``ingest.privacy.erasure`` does Postgres).

``sweep`` runs in the workers (an arq cron) and from ``refstream erase``; it finishes
every erasure the ledger holds as pending, all of them in one pass over each place:

- Postgres, again, behind the ledger's fence (``ingest.privacy.erasure_late.recheck``): an event
  row whose visitor, click or customer the ledger names and that still holds personal data
  (a batch stored it beside the one whose late lead taught the ledger that visitor).

- Redis: every stream entry (each partition the layout ever had, the dead letters and the
  dropped ones) that names an erased person and still holds their data. An entry every
  consumer group has read and acked is deleted (XDEL: what a trim would do later); one a
  group has yet to read or ack is left to it (the workers store it scrubbed) and found
  again by the next sweep. A dead letter is replaced by its scrubbed copy. The
  idempotency answers that name the person are rewritten in place, keeping their status
  and fingerprint, so a client's retry still gets its answer and appends nothing.
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
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog
from redis.asyncio.cluster import RedisCluster

from ingest.contract import clicks, erasure, layout, wire
from ingest.contract.connections import Redis
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.events import Envelope, EventType
from ingest.contract.keys import Keys, parse_id
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
    entries_waiting: int = 0  # stream entries a group has yet to read or ack: next sweep
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
    streams = [keys.stream(p) for p in range(high)]
    for s in streams:
        await _stream(redis, keys, s, check, result)
    for s in (keys.dead, keys.dead + ":dropped"):
        await _letters(redis, s, check, result)
    await _answers(redis, keys, check, result)
    await _fingerprints(redis, keys, check, result)
    if result.entries_waiting:
        log.info("erasure.redis_waiting", entries=result.entries_waiting)
        return result
    if (short := await _fenced(redis, keys, high, replicas, wait_ms)) is not None:
        log.info("erasure.redis_unreplicated", why=short)  # a failover could bring back what it removed
        return result
    if redis_pending := [r for r in rows if r["redis_at"] is None]:
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


async def _personal_pages(
    redis: Redis, stream: str, check: _Check
) -> AsyncIterator[list[tuple[Any, dict[bytes, bytes], Envelope]]]:
    """``stream`` a page at a time: its entries that name an erased person and still hold
    their data, as (stream id, fields, envelope)."""
    start = "-"
    while True:
        page = await redis.xrange(stream, min=start, max="+", count=_PAGE)
        if not page:
            return
        decoded = erased.decoded(page)
        hits = await check.personal([e for _, e in decoded])
        yield [(page[decoded[j][0]][0], page[decoded[j][0]][1], decoded[j][1]) for j in sorted(hits)]
        if len(page) < _PAGE:
            return
        last = page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0]
        start = "(" + last


async def _stream(redis: Redis, keys: Keys, stream: str, check: _Check, result: SweepResult) -> None:
    try:
        groups = await redis.xinfo_groups(stream)
    except Exception as exc:  # no such stream: nothing in it
        if "no such key" in str(exc).lower():
            return
        raise
    async for hits in _personal_pages(redis, stream, check):
        await _uncache(redis, keys, [e for _, _, e in hits], result)
        for sid, _, _ in hits:
            if await _read_by_all(redis, stream, groups, sid):
                result.entries_deleted += await redis.xdel(stream, sid)
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


async def _letters(redis: Redis, stream: str, check: _Check, result: SweepResult) -> None:
    """Dead letters are read by operators, not groups: each of the person's is replaced by its
    scrubbed copy (the letter's own fields kept) at the end of the stream."""
    async for hits in _personal_pages(redis, stream, check):
        for sid, fields, e in hits:
            copy: dict[Any, Any] = {k: v for k, v in fields.items() if k not in FIELDS and k != FIELD}
            if FIELD in fields:
                copy[FIELD] = wire.to_blob(check.scrub(e))
            else:
                copy.update(erased.fields_of(check.scrub(e)))
            await redis.xadd(stream, copy)
            await redis.xdel(stream, sid)
            result.letters_replaced += 1


async def _answers(redis: Redis, keys: Keys, check: _Check, result: SweepResult) -> None:
    """The idempotency answers (``ingest.edge.idempotency.Answer``: fingerprint, status, JSON
    body) whose body names an erased person, rewritten without them where unchanged since."""
    # a record names the workspace it answers for (``Keys.idempotent``): a customer id is
    # probed in that workspace's terms alone, so another workspace's erasure of the same
    # client-chosen id leaves it be. A record that names none (a public route's, or one
    # written before records named theirs) is tried in each with an erasure
    spaces = await check.pg.fetchval("SELECT array_agg(DISTINCT workspace_id::text) FROM erasures") or []
    async for name in redis.scan_iter(match=f"{keys.prefix}:idk:*", count=_PAGE):
        raw = await redis.get(name)
        if raw is None or len(raw) < 35 or raw[35:36] not in (b"{", b"["):
            continue  # a reservation, or an answer sealed for a management write (never in clear)
        try:
            body = orjson.loads(raw[35:])
        except orjson.JSONDecodeError:
            continue
        own = Keys.record_workspace(name.decode() if isinstance(name, bytes) else name)
        new = await _redacted(body, check, spaces if own is None else [ws for ws in spaces if ws == own])
        if new is None:
            continue
        changed = raw[:35] + orjson.dumps(new)  # as deep as the answer orjson wrote at the edge
        # only if unchanged since it was read; the record keeps its expiry
        if await redis.eval(_SWAP, 1, name, raw, changed):  # type: ignore[misc]
            result.answers_rewritten += 1


async def _fingerprints(redis: Redis, keys: Keys, check: _Check, result: SweepResult) -> None:
    """Affixo's fingerprint cache (``ingest.edge.routes.affixo``: a fingerprint's first
    visitor, for 90 days) names an erased visitor: the entry goes (only if unchanged since
    it was read), so no later click of that fingerprint is handed the erased visitor."""
    spaces = await check.pg.fetchval("SELECT array_agg(DISTINCT workspace_id::text) FROM erasures") or []
    for ws in spaces:
        names, values = [], []
        async for name in redis.scan_iter(match=f"{keys.prefix}:fp:{ws}:*", count=_PAGE):
            value = await redis.get(name)
            if isinstance(value, bytes) and not erasure.is_pseudonym(v := value.decode(errors="replace")):
                names.append(name)
                values.append((value, erasure.digest(check.key, VISITOR, v)))
        if not names:
            continue
        found = {
            bytes(d)
            for d in await check.pg.fetchval(
                "SELECT array(SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2)",
                [d for _, d in values],
                uuid.UUID(ws),
            )
        }
        for name, (value, d) in zip(names, values, strict=True):
            if d in found and await redis.eval(_DROP, 1, name, value):  # type: ignore[misc,arg-type]
                result.fingerprints_deleted += 1


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
