"""The spool's drain: while there is something spooled and Redis answers, the oldest rows
are replayed with pipelined XADDs, and every row whose XADD Redis confirmed is deleted in
one transaction; a drain that stops halfway resumes after the last row it deleted. One
drainer at a time over every process sharing the directory (an ``flock`` on
``drain.lock``, released by the kernel if the process dies), so several edges can share a
spool and no row is replayed by two. A crash between an XADD and its delete replays that
batch (at most ``DRAIN_BATCH`` rows) once more: the copies carry the same event ids and the
workers store each event once. While Redis is down the loop asks it one PING per tick and
touches nothing else.

A keyed row is replayed through the edge's own script (``ingest.link.once.APPEND_ONCE``):
appended only if Redis holds no record of its key, so a copy of the same key that reached
Redis another way (another edge, or this request's own append whose outcome was unknown) is
not appended twice.

A drained row is deleted only once Redis confirmed it at ``REFSTREAM_ACK_DURABILITY``'s
level (``ingest.link.durability``): the WAIT (or WAITAOF) ends each drain step's pipeline,
and a step short of it deletes nothing and is sent again (same event ids) on the next tick.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ingest.contract import erasure
from ingest.contract.connections import Redis, cancelled_meanwhile, client_fault
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.layout import Watch
from ingest.link.choice import Translated, link_for
from ingest.link.durability import Durability
from ingest.link.errors import through
from ingest.spool import store as store
from ingest.spool.replay import replay, reroute, scrubbed_rows

log = structlog.get_logger("ingest.spool")

DRAIN_BATCH = 500
T = TypeVar("T")


class SpoolDrainFailed(Outage):
    """A file-system step of the drain failed; already logged and counted."""


# a drain step's hold on the erasure ledger (``ingest.contract.erasure.held`` on the edge's pool)
Ledger = Callable[[], AbstractAsyncContextManager[erasure.Check]]


class Drain:
    """The drain of a spool (``ingest.spool.spool.Spool`` is one): what it sends, when, and
    the rows it deletes once Redis confirmed them; and the bookkeeping of failing file-system
    operations the drain and the spool's writer share."""

    # kept by the spool, which the writer shares: its directory, its stop, its totals
    dir: Path
    _stop: asyncio.Event
    _entries: int
    _bytes: int

    def __init__(self, durability: Durability | None) -> None:
        self.durability = durability or Durability()  # what a drained row must reach before its delete
        self._drainer: asyncio.Task[None] | None = None
        self._dconn: sqlite3.Connection | None = None  # the drainer's (its task only)
        self._lock_fd: int | None = None
        self._replayed: set[int] = set()  # rows in Redis whose delete failed: never sent again
        self._redis_error: str | None = None  # the drain waits for Redis (logged once)
        self._link: tuple[Redis, Translated] | None = None  # the drain's way to Redis, and for which client
        self._reached: Callable[[], None] | None = None  # called when a drain with rows reaches Redis
        self._layout: Watch | None = None  # the partition layout rows are routed by when drained
        # the erasure ledger (``ingest.contract.erasure.held``): rows of an erased person go
        # to Redis scrubbed; set by the edge (it reads the ledger in Postgres)
        self._ledger: Ledger | None = None
        self.drained = 0
        self.ticks = 0  # drain loop iterations
        self._failing: dict[str, str] = {}  # op -> error, while it fails (logged once per change)
        self._error_recorded = False
        self.errors: Counter[str] = Counter()  # failed file-system operations by op, for /metrics

    # -- failing file-system operations, the drain's and the writer's, logged once each ----

    def _note_error(self, conn: sqlite3.Connection | None, op: str, exc: BaseException) -> None:
        """Where `refstream status` reads it, if the disk lets us. The connection stays open:
        closing the last one would checkpoint, and on a full disk opening one can fail."""
        if conn is not None:
            store.record_error(conn, op, store.describe(exc))
            self._error_recorded = True

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors[op] += 1
        if op not in self._failing:
            log.error("spool.failing", op=op, error=store.describe(exc), dir=str(self.dir))
        self._failing[op] = store.describe(exc)

    def _recovered(self, op: str) -> None:
        if self._failing.pop(op, None) is not None:
            log.info("spool.recovered", op=op, failures=self.errors[op])

    # -- draining ------------------------------------------------------------------------

    async def drain(self, redis: Redis) -> int:
        """Replay what is spooled (by any process sharing the directory), oldest first, unless
        another process is draining it. Returns the entries replayed. Raises what Redis
        raised; file-system failures are logged and counted, and end this drain."""
        if not store.path_in(self.dir).exists():
            self._entries = self._bytes = 0
            return 0
        self._entries, self._bytes = await self._store("drain_read", self._totals_sync)
        if self._entries == 0 and not self._replayed:
            return 0
        if not await self._store("drain_lock", self._lock_sync):
            return 0  # another process drains it
        try:
            await through(redis.ping())  # while Redis is down: nothing read, nothing written
            if self._reached is not None:  # before a row is replayed: so before the spool empties
                self._reached()
            return await self._drain_locked(redis)
        finally:
            # else held: nobody may send those rows again (and a lock closed already is given back)
            if not self._replayed and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _drain_locked(self, redis: Redis) -> int:
        n = 0
        try:
            while not self._stop.is_set():
                rows = await self._store("drain_read", self._oldest_sync)
                if not rows:
                    break
                link, todo = self._link_to(redis), [r for r in rows if r.id not in self._replayed]
                routed = None  # the layout these rows are routed by, and checked against
                if self._layout is not None:  # the partition count may have changed since they came
                    routed = await through(self._layout.read())
                    todo, found = await reroute(link, todo, self._layout.keys, routed)
                    self._replayed.update(found)
                if self._ledger is None:
                    sent, error = await replay(link, todo, self.durability, self._layout, routed)
                else:  # raises while the ledger cannot be read: drained later, never unchecked
                    async with self._ledger() as check:
                        todo = await scrubbed_rows(check, todo)
                        sent, error = await replay(link, todo, self.durability, self._layout, routed)
                self._replayed.update(sent)
                n += len(sent)
                ids = [r.id for r in rows if r.id in self._replayed]
                if ids:
                    self._entries, self._bytes = await self._store("drain_delete", self._delete_sync, ids)
                    self._replayed.difference_update(ids)
                if error is not None:
                    raise error
            if self._entries == 0 and n:
                await self._store("vacuum", self._vacuum_sync)
        finally:
            if n:
                self.drained += n
                log.info("spool.drained", entries=n, left=self._entries)
        return n

    def _link_to(self, redis: Redis) -> Translated:
        """The edge's kind of link to ``redis`` (one per spool): on a Redis Cluster each
        primary's share of a drain step ends with its own WAIT (``ClusterLink``)."""
        if self._link is None or self._link[0] is not redis:
            self._link = (redis, link_for(redis))
        return self._link[1]

    async def _store(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = await asyncio.to_thread(fn, *args)
        except (sqlite3.Error, OSError) as exc:
            self._failed(op, exc)
            raise SpoolDrainFailed(op) from exc
        self._recovered(op)
        return result

    def _conn(self) -> sqlite3.Connection:
        if self._dconn is None:
            self._dconn = store.connect(self.dir)
        return self._dconn

    def _guarded(self, op: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except (sqlite3.Error, OSError) as exc:
            self._note_error(self._dconn, op, exc)
            raise

    def _totals_sync(self) -> tuple[int, int]:
        return self._guarded("drain_read", store.totals)

    def _oldest_sync(self) -> list[store.Row]:
        return self._guarded("drain_read", lambda c: store.oldest(c, DRAIN_BATCH))

    def _delete_sync(self, ids: list[int]) -> tuple[int, int]:
        try:
            return store.delete(self._conn(), ids)
        except sqlite3.Error as exc:
            if not (store.is_full(exc) and store.give_reserve(self.dir)):
                self._note_error(self._dconn, "drain_delete", exc)
                raise
        # the disk is full: the reserve is free now, delete in small steps, each checkpointed
        log.warning("spool.reserve_released", dir=str(self.dir), reason="a delete met a full disk")
        after = (self._entries, self._bytes)
        for start in range(0, len(ids), 50):
            after = self._guarded("drain_delete", functools.partial(_delete, ids=ids[start : start + 50]))
        return after

    def _vacuum_sync(self) -> None:
        self._guarded("vacuum", store.vacuum_free)
        store.take_reserve(self.dir)

    def _lock_sync(self) -> bool:
        if self._lock_fd is None:
            self._lock_fd = os.open(self.dir / store.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def _drain_loop(self, redis: Redis, every_s: float) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), every_s)
                return
            except TimeoutError:
                pass
            self.ticks += 1
            try:
                await self.drain(redis)
            except SpoolDrainFailed:
                continue  # logged once when it started failing; retried next tick
            except erasure.LedgerUnavailable as exc:  # Postgres away: nothing goes unchecked
                if self._redis_error is None:
                    log.warning("spool.drain_waiting", error=repr(exc.__cause__), entries=self._entries)
                self._redis_error = repr(exc)
                continue
            except Exception as exc:
                # Redis away, or refusing (the link's errors and the calls ``through`` it are
                # the tree's), or a connection redis-py's code closed under a command (a Redis
                # killed while the client connected: uvloop's "the handler is closed")
                if not isinstance(exc, NotSent | OutcomeUnknown) and not client_fault(exc):
                    log.exception("spool.drain_failed")
                    continue
                cancelled_meanwhile()
                if self._redis_error is None:
                    log.warning("spool.drain_waiting", error=exc, entries=self._entries)
                self._redis_error = repr(exc)
                continue
            if self._redis_error is not None:
                log.info("spool.drain_resumed", entries=self._entries)
                self._redis_error = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(
        self,
        redis: Redis,
        *,
        every_s: float = 1.0,
        reached: Callable[[], None] | None = None,
        layout: Watch | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        """Drain every ``every_s``; ``reached`` is called when a drain with rows to send
        reaches Redis (the edge's breaker, if open, may probe at once rather than at its
        interval: the edge's own requests learn that Redis is back no later than the spool).
        ``layout``: the edge's partition layout, read before each drain step; a row whose
        partition is no longer written goes to its code's partition now (``reroute``).
        ``ledger``: the erasure ledger, checked for each step's envelopes (``scrubbed_rows``)."""
        self._reached = reached
        self._layout = layout
        self._ledger = ledger
        self._drainer = asyncio.create_task(self._drain_loop(redis, every_s), name="spool-drainer")

    async def _close_drain(self) -> None:
        """Close the drain's store connection, its link and its lock (after the drainer ended)."""
        if self._dconn is not None:
            self._dconn.close()
            self._dconn = None
        if self._link is not None:
            await self._link[1].close()
            self._link = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the drain lock
            self._lock_fd = None


def _delete(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, int]:
    return store.delete(conn, ids)
