"""An erasure in Redis (``workers.ops.erasure``'s sweep): the people's stream entries, their
dead letters, the idempotency answers of their events and the fingerprint cache's entries
of their visitors, each found by what the ledger and their rows name
(``ingest.contract.erasure_index``), never by a scan of every key or a read of every stream."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks, erasure, erasure_index, wire
from ingest.contract.connections import Redis
from ingest.contract.erasure import EVENT, EXTERNAL, VISITOR
from ingest.contract.events import Envelope, EventType
from ingest.contract.keys import GROUP, Keys, parse_id
from workers.archive import erased
from workers.ops.erasure_reach import Check, Event, SweepResult, Theirs

_PAGE = 1000


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


async def streams(redis: Redis, keys: Keys, high: int) -> list[_Stream]:
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


def unread(streams: list[_Stream], rows: list[asyncpg.Record]) -> int:
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


async def waiting(redis: Redis, keys: Keys, rows: list[asyncpg.Record]) -> int:
    """The erasures' workspaces whose waiting room holds events (a shard down, a move's fence:
    ``workers.consumer.waiting``). Their entries were acked as they were parked, and no row
    names them yet: one may be the person's, raw in its stream until a sweep after the drain
    finds it by its row (seed 1789722521: a click parked through a move kept its referrer)."""
    spaces = sorted({str(r["workspace_id"]) for r in rows})
    return sum([1 for ws in spaces if await redis.xlen(keys.waiting_room(ws))])


async def entries(
    redis: Redis, keys: Keys, streams: list[_Stream], theirs: list[Theirs], check: Check, result: SweepResult
) -> None:
    """The people's entries: those the workers filed under one of their digests
    (``Keys.entries_of``), and each stored event's found by its time in its stream (its own
    partition first); each that still holds their data is deleted once every group has
    read and acked it, else left to the next sweep.

    An event's entry found by its time that the workers filed is a copy, or one stored as
    no row: the entry they stored the event from (never filed: near its time) may be in
    another partition (appended under an earlier partition count, its copy under the next
    one) or later in the span, and the search goes on until it meets an entry not filed.
    (It stopped at the first: a click's stored entry in its old partition kept its referrer
    while its copy, in the code's partition now, was deleted; the generative test's
    ``erased_kept`` of a click's stream entry, in seeds that changed the partition count.)"""
    by_partition = {s.partition: s for s in streams}
    found: dict[tuple[int, bytes], dict[bytes, bytes]] = {}
    for t in theirs:
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
        filed = set(found)
        for e in t.events:
            await _stored_entry(redis, by_partition, e, filed, found)
    await _handle(redis, keys, by_partition, found, check, result)


async def _stored_entry(
    redis: Redis,
    streams: dict[int, _Stream],
    e: Event,
    filed: set[tuple[int, bytes]],
    found: dict[tuple[int, bytes], dict[bytes, bytes]],
) -> None:
    """The entries of ``e`` found by its time, its own partition first, added to ``found``
    up to the first one the workers did not file (``filed``): the one they stored it from."""
    for p in sorted(streams, key=lambda p: (p != e.hint, p)):
        s = streams[p]
        if s.first_ms is None or e.ms + erasure_index.NEAR_AFTER_MS < s.first_ms:
            continue  # trimmed (or deleted) by now
        if await _by_time(redis, p, s.name, e, filed, found):
            return


async def _by_time(
    redis: Redis,
    p: int,
    stream: str,
    e: Event,
    filed: set[tuple[int, bytes]],
    found: dict[tuple[int, bytes], dict[bytes, bytes]],
) -> bool:
    """The entries of ``e`` in partition ``p``'s ``stream`` added to ``found``, read from its
    event's time (an entry follows its event within moments), then from a moment before
    it, up to the first one not ``filed``: whether one was met."""
    for low, high in (
        (e.ms, e.ms + erasure_index.NEAR_AFTER_MS),
        (e.ms - erasure_index.NEAR_BEFORE_MS, e.ms - 1),
    ):
        start = f"{low}-0"
        while True:
            page = await redis.xrange(stream, min=start, max=f"{high}-{2**63 - 1}", count=_NEAR_PAGE)
            for sid, fields in page:
                if _event_id(fields) == e.event_id:
                    found[(p, _bytes(sid))] = fields
                    if (p, _bytes(sid)) not in filed:
                        return True
            if len(page) < _NEAR_PAGE:
                break
            start = "(" + _bytes(page[-1][0]).decode()
    return False


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
    check: Check,
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


async def cached_clicks(redis: Redis, keys: Keys, theirs: list[Theirs], result: SweepResult) -> None:
    """The click cache's entries of their clicks (each keeps its visitor for the cookie
    window): deleted again by every sweep. The erasure's request deletes them at once, but
    that is best effort (a Redis away, or a failover that lost the delete), and nothing else
    would until the window ends."""
    names = [keys.click(c) for t in theirs for c in t.cached]
    for i in range(0, len(names), _PAGE):
        pipe: Any = redis.pipeline(transaction=False)
        for name in names[i : i + _PAGE]:
            pipe.delete(name)
        result.clicks_uncached += sum(await pipe.execute())


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


async def answers(
    redis: Redis, keys: Keys, theirs: list[Theirs], check: Check, result: SweepResult, high: int | None = None
) -> None:
    """The idempotency answers (``ingest.edge.idempotency.Answer``: fingerprint, status, JSON
    body) of the people's own events, each rewritten without them where unchanged since, in
    its own workspace's terms. An event's key is known by the index the edge and a spool's
    drain file each record in (``Keys.answers``, and ``Keys.answers_before`` an earlier edge
    wrote: by its event's time and id; the digest of its key) and by the key's digest its
    row carries (a keyed row's dedupe value; none for a sale). Each key's records are read
    in every partition up to ``high`` (default: the current count), named and not
    (``Keys.idempotent``): a key's records sit where the partition count of the moment put
    them, and the index entry of the stored event may name another partition than its
    record's (a drain's filing after a count change names the partition it routed to, while
    the key's record, which its script found, was an earlier count's), or be missing (a
    filing lost beside its record, or an edge that filed none), and a retried key's record
    may be another attempt's. A few names per keyed event of theirs: what they own, never
    every record."""
    partitions = range(max(high or 0, keys.partitions))
    for t in theirs:
        if not t.events:
            continue
        records: set[str] = set()
        floors: list[tuple[str, int]] = []  # each index, and its earliest event's time
        for index in (keys.answers(t.workspace_id), keys.answers_before(t.workspace_id)):
            if oldest := await redis.zrange(index, 0, 0, withscores=True):
                floors.append((index, int(oldest[0][1])))
        for e in t.events:
            digests = set()
            for index in (i for i, floor in floors if e.ms >= floor):
                for member in await redis.zrangebyscore(index, e.ms, e.ms):
                    if (parsed := erasure_index.parse_answer(member)) is not None and parsed[0] == e.event_id.hex:
                        digests.add(parsed[2])
            if e.dedupe is not None:
                digests.add(e.dedupe)
            for digest in digests:
                for p in partitions:
                    records.update((keys.idempotent(digest, p, t.workspace_id), keys.idempotent(digest, p)))
        names = sorted(records)
        raws: list[Any] = []
        for i in range(0, len(names), _PAGE):  # read in pipelines: a round trip a page of names
            pipe: Any = redis.pipeline(transaction=False)
            for name in names[i : i + _PAGE]:
                pipe.get(name)
            raws += await pipe.execute()
        for name, raw in zip(names, raws, strict=True):
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


async def fingerprints(redis: Redis, keys: Keys, theirs: list[Theirs], check: Check, result: SweepResult) -> None:
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


async def _redacted(body: Any, check: Check, spaces: list[str]) -> Any:
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
