"""The dead letters of the people a sweep erases (``workers.ops.erasure``): each replaced by
its scrubbed copy, and the entry it was made of swept like any other of theirs
(``workers.ops.erasure_redis``)."""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg

from ingest.contract import wire
from ingest.contract.connections import Redis
from ingest.contract.keys import Keys
from ingest.contract.wire import FIELD, FIELDS
from workers.archive import erased
from workers.ops.erasure_reach import Check, SweepResult
from workers.ops.erasure_redis import _PAGE, _bytes, _handle, _Stream, _text

# a letter replaced by its scrubbed copy (ARGV: the letter's id, then the copy's fields),
# both or neither; in two round trips a failover between them kept the delete alone, and the
# event, its letter gone, could never be requeued
_REPLACE = """
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], ARGV[1])
"""


async def letters(
    redis: Redis,
    keys: Keys,
    stream: str,
    streams: list[_Stream],
    rows: list[asyncpg.Record],
    check: Check,
    result: SweepResult,
    shard: str = "default",
) -> None:
    """Dead letters are read by operators, not groups: each of the person's is replaced by its
    scrubbed copy (the letter's own fields kept) at the end of the stream, and the entry it
    was made of goes like any other of theirs. No row names a letter: the letters are read
    once for each state of the pending erasures (a new one, one that learned something:
    ``erasures.generation``), and between them only those written since (a cursor kept in
    Redis, one for each shard's sweeps: ``shard``; a cursor the shards shared was set back
    by each other's, whose erasures differ, and every sweep read every letter): what
    changed, never the whole stream every sweep."""
    state = hashlib.sha256(" ".join(sorted(f"{r['id']}:{r['generation']}" for r in rows)).encode()).hexdigest()[:32]
    cursor = f"{keys.prefix}:erasure:read:{shard}:{stream}"
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
            # one script: a failover or a full Redis never keeps the delete without the copy
            flat = [x for pair in copy.items() for x in pair]
            await redis.eval(_REPLACE, 1, stream, sid, *flat)  # type: ignore[misc]
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
