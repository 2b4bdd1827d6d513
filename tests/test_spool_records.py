"""A keyed copy's record in the spool (``ingest.spool.store``: ``records``): every process
sharing the spool keeps one copy of a key, the drain appends none when another copy reached
Redis first, and a spool an older edge made (no such table) opens and takes keyed copies."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from ingest.contract.keys import Keys
from ingest.spool import store as spool_store
from ingest.spool.spool import Spool
from ingest.spool.store import Once

WINDOW_MS = 60_000


def keyed(keys: Keys, answer: bytes) -> tuple[str, bytes, Once]:
    """(stream, an envelope-like blob, the key's check) for one keyed copy."""
    record = keys.idempotent(uuid.uuid4().hex, 0)
    return keys.streams[0], orjson.dumps({"event_id": uuid.uuid4().hex}), Once(record, answer, WINDOW_MS)


async def test_one_copy_of_a_key_kept_and_none_appended_over_redis_record(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
):
    spool, other = Spool(tmp_path, max_bytes=1 << 20), Spool(tmp_path, max_bytes=1 << 20)
    try:
        stream, blob, once = keyed(keys, b"first-copy-answer")
        assert await spool.append(stream, blob, once=once) is None  # kept: the key's first copy here
        again = await other.append(stream, blob, once=Once(once.record, b"second-copy-answer", WINDOW_MS))
        assert again == b"first-copy-answer"  # another process of the spool: not kept
        # meanwhile another copy of the key reached Redis through an edge with a spool of its own
        await redis.set(once.record, b"redis-answer", px=WINDOW_MS)
        assert await spool.drain(redis) == 1  # one row: the second copy was never kept
        assert await redis.xlen(stream) == 0  # the drain's check found Redis's record: nothing appended
        assert await redis.get(once.record) == b"redis-answer"
    finally:
        await spool.close()
        await other.close()


async def test_a_spool_an_older_edge_made_opens_and_keeps_keyed_copies(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
):
    old = sqlite3.connect(spool_store.path_in(tmp_path))
    old.executescript(
        """CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, stream TEXT NOT NULL,
               envelope BLOB NOT NULL, extra BLOB, size INTEGER NOT NULL);
           CREATE TABLE totals (one INTEGER PRIMARY KEY CHECK (one = 1), entries INTEGER NOT NULL,
               bytes INTEGER NOT NULL, error_op TEXT, error TEXT, error_at_ms INTEGER);
           INSERT INTO totals (one, entries, bytes) VALUES (1, 0, 0);"""
    )
    old.close()
    spool = Spool(tmp_path, max_bytes=1 << 20)
    try:
        stream, blob, once = keyed(keys, b"an-answer")
        assert await spool.append(stream, blob, once=once) is None
        assert await spool.append(stream, blob, once=Once(once.record, b"another", WINDOW_MS)) == b"an-answer"
        await redis.xgroup_create(stream, "workers", id="0", mkstream=True)  # as an edge makes its streams
        assert await spool.drain(redis) == 1
        assert await redis.get(once.record) == b"an-answer"
    finally:
        await spool.close()
