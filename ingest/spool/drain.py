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
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ingest.contract import clock, erasure, erasure_index, wire
from ingest.contract.connections import Command, Redis, cancelled_meanwhile, client_fault
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.keys import Keys
from ingest.contract.layout import Layout, PartitionGone, Watch
from ingest.contract.wire import EnvelopeError, entry_from_blob
from ingest.link.choice import Translated, link_for
from ingest.link.cluster import ClusterLink
from ingest.link.durability import Durability
from ingest.link.errors import Rejected, through
from ingest.link.once import APPEND_ONCE
from ingest.spool import store as store

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
                    todo, found = await _reroute(link, todo, self._layout.keys, routed)
                    self._replayed.update(found)
                if self._ledger is None:
                    sent, error = await _replay(link, todo, self.durability, self._layout, routed)
                else:  # raises while the ledger cannot be read: drained later, never unchecked
                    async with self._ledger() as check:
                        todo = await _scrubbed(check, todo)
                        sent, error = await _replay(link, todo, self.durability, self._layout, routed)
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
                    log.warning("spool.drain_waiting", error=repr(exc), entries=self._entries)
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
        partition is no longer written goes to its code's partition now (``_reroute``).
        ``ledger``: the erasure ledger, checked for each step's envelopes (``_scrubbed``)."""
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


async def _reroute(
    link: Translated, rows: list[store.Row], keys: Keys, layout: Layout
) -> tuple[list[store.Row], list[int]]:
    """(rows to send, ids already done): a row whose partition the edges no longer write (a
    partition count changed: ``ingest.contract.layout``) goes to its code's partition now, and
    a keyed one moves its key's record along, still checked against the record where it was
    (in its script; on a Redis Cluster, whose script cannot reach another slot, read first:
    a row whose key has a copy there is done)."""
    out: list[store.Row] = []
    done: list[int] = []
    counts = layout.earlier(clock.now_ms())  # as the edges' keyed appends look
    for r in rows:
        p = Keys.partition_of(r.stream)
        if p is None or (r.once is None and p < layout.count):
            out.append(r)  # written by the edges, and read: it may stay
            continue
        code = wire.from_blob(r.envelope).routing_key()
        q = keys.partition_for(code, layout.count) if isinstance(code, str) else p % layout.count
        once, earlier = r.once, r.earlier
        if once is not None:
            # a keyed row goes where a copy routed by the current count looks for its key, and
            # is checked against its key's records wherever an earlier count put them (an
            # edge's append by that count may have stored the key's first copy there). Its
            # record's own partition, not its stream's: the two differ when the edge read a
            # new count between the check and the spooling (generative seed 1419696670)
            rp = Keys.record_partition(once.record)
            rp = p if rp is None else rp
            tag = f":idk:{{{rp}}}:"
            others = {p, rp, *(keys.partition_for(code, c) for c in counts)} if isinstance(code, str) else {p, rp}
            records = {x: once.record.replace(tag, f":idk:{{{x}}}:") for x in {*others, q}}
            earlier = tuple(sorted({*earlier, *(records[x] for x in others)} - {records[q]}))
            once = store.Once(records[q], once.answer, once.window_ms)
        if (q, earlier) == (p, r.earlier):
            out.append(r)
            continue
        out.append(replace(r, stream=keys.stream(q), once=once, earlier=earlier))
    if isinstance(link.inner, ClusterLink) and (keyed := [r for r in out if r.earlier]):
        replies = await link.send([("GET", e) for r in keyed for e in r.earlier])
        it = iter(replies)
        found = {r.id for r in keyed if [x for _, x in zip(r.earlier, it, strict=False) if x is not None]}
        done = sorted(found)
        out = [replace(r, earlier=()) if r.earlier else r for r in out if r.id not in found]
    if moved_n := sum(1 for a, b in zip(rows, out, strict=False) if a.stream != b.stream):
        log.info("spool.rerouted", rows=moved_n, count=layout.count)
    return out, done


async def _scrubbed(scrub: erasure.Check, rows: list[store.Row]) -> list[store.Row]:
    """``rows`` with an erased person's envelopes scrubbed, and the answer a keyed row stores
    for its key's repeats, and its extra commands (the click cache's entry), without the
    values the scrub took out (``erasure.redact``)."""
    envelopes, where = [], []
    for i, r in enumerate(rows):
        try:
            envelopes.append(wire.from_blob(r.envelope))
            where.append(i)
        except EnvelopeError:
            continue  # the workers dead-letter it, as they would have
    found = await scrub(envelopes) if envelopes else {}
    if not found:
        return rows
    out = list(rows)
    for j, scrubbed in found.items():
        i, before = where[j], envelopes[j]
        once = rows[i].once
        if once is not None:
            once = replace(once, answer=erasure.scrub_answer(once.answer, before, scrubbed))
        extra = erasure.scrub_commands(rows[i].extra, before, scrubbed)  # the click cache's entry
        out[i] = replace(rows[i], envelope=wire.to_blob(scrubbed), once=once, extra=extra)
    log.info("spool.scrubbed", rows=len(found))
    return out


def _filed(layout: Watch | None, r: store.Row) -> tuple[Command, ...]:
    """A keyed row's record filed under its event, as the edge files it beside its own
    append (``ingest.contract.erasure_index``): the erasure's sweep reads it there."""
    if r.once is None or layout is None:
        return ()
    try:
        e = wire.from_blob(r.envelope)
    except EnvelopeError:
        return ()
    return erasure_index.record_commands(layout.keys, e, r.once.record, r.once.window_ms)


async def _replay(
    link: Translated,
    rows: list[store.Row],
    durability: Durability,
    layout: Watch | None = None,
    routed: Layout | None = None,
) -> tuple[list[int], BaseException | None]:
    """XADD ``rows`` (and their extra commands) in one round trip, ended by the durability
    level's WAIT when it has one: (ids Redis confirmed, the first error). A keyed row goes
    through ``APPEND_ONCE`` instead of its XADD: done whether it appended or found its key's
    record (a copy is in Redis already). A row whose append was refused (a full Redis)
    stays; the others go, unless the WAIT fell short: then all stay. A row keeps its
    envelope as the version-1 blob (``wire.to_blob``); it goes on the stream as
    version 3's packed field."""
    if not rows:
        return [], None
    nomk = ("NOMKSTREAM",) if layout is not None else ()  # without a layout (a bare spool) as ever
    filed = {r.id: _filed(layout, r) for r in rows}
    commands: list[Command] = []
    for r in rows:
        fields = [x for pair in entry_from_blob(r.envelope).items() for x in pair]
        if r.once is None:  # NOMKSTREAM: a retired partition is not made again (ingest.contract.layout)
            commands.append(("XADD", r.stream, *nomk, "*", *fields))
        elif layout is None or routed is None or isinstance(link.inner, ClusterLink):  # EVAL: not the hot path
            o = r.once
            commands.append(("EVAL", APPEND_ONCE, 2, o.record, r.stream, o.answer, o.window_ms, "", "", *fields))
        else:  # checked against the count it was routed by (``_reroute``): STALE if it changed since
            o, earlier = r.once, r.earlier
            commands.append(
                (
                    "EVAL",
                    APPEND_ONCE,
                    3 + len(earlier),
                    o.record,
                    r.stream,
                    layout.keys.layout,
                    *earlier,
                    o.answer,
                    o.window_ms,
                    routed.count,
                    routed.changed_ms,
                    *fields,
                )
            )
        commands.extend(r.extra)
        commands.extend(filed[r.id])
    if durability.waits:
        commands.append(durability.command())
    try:
        replies = await link.send(commands)
    except (NotSent, OutcomeUnknown) as exc:
        return [], exc  # lost mid-pipeline: what landed is sent again next time (same event ids)
    if durability.waits and (short := durability.failure(replies[-1])) is not None:
        return [], short  # in the primary, not yet where the level says: sent again next time
    sent: list[int] = []
    error: BaseException | None = None
    i = 0
    for r in rows:
        reply = replies[i]
        i += 1 + len(r.extra) + len(filed[r.id])
        if reply is None and r.once is None:  # its stream is gone: routed anew next step
            reply = PartitionGone(f"GONE {r.stream}")
            if layout is not None:
                layout.poke(r.stream)
        if isinstance(reply, Exception):
            code = reply.code if isinstance(reply, Rejected) else ""
            if (code == "GONE" or isinstance(reply, PartitionGone)) and layout is not None:
                layout.poke(r.stream)
            elif code == "STALE" and layout is not None:
                layout.poke()  # the count changed since the reroute: read, routed anew next step
            error = error or reply
            continue
        sent.append(r.id)
    return sent, error
