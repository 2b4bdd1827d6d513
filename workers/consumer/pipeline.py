"""One batch, top to bottom: decode → count the attempt → store (one transaction) → COMMIT
→ dead-letter the poison → XACK.

Ack after commit, always: a crash between the two redelivers the batch, and the store
makes the second pass a no-op. The opposite order would lose events on a crash.

A batch is carried by a ``Batch`` that remembers which stages are done. When an outage
stops a stage (``BatchOutage``: Postgres or Redis, never the entries), the consumer holds the
``Batch`` in memory and calls ``process`` again after a backoff; the stages already done
are not repeated, and the entries are never read again from Redis, so an outage, however
long, adds nothing to their delivery history.

Poison is counted per entry, not per delivery. The first delivery of an entry is not
counted (the hot path pays nothing). An entry read again from the backlog, after a worker
stopped without acking it, is *tracked*: each attempt adds one to its count in
``{prefix}:attempts:{p}`` before the transaction, and an outage gives that one back. What
stays counted is the attempts a worker never finished: it crashed, or was killed, while
holding the entry. Past ``max_deliveries`` such attempts the entry is dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from arq.connections import ArqRedis
from asyncpg import PostgresError

from ingest.contract import bounds, wire
from ingest.contract.bounds import BoundsError
from ingest.contract.connections import Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import GROUP, Keys
from ingest.contract.logs import error_fields
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from ingest.contract.wire import EnvelopeError
from ingest.ledger import placement
from workers.consumer import dead_letters, erased, store, webhooks
from workers.consumer.combine import Combiner
from workers.consumer.dead_letters import Dead
from workers.consumer.enrich import Enricher
from workers.consumer.metrics import WorkerMetrics
from workers.consumer.restore import LedgerRestore
from workers.consumer.waiting import Rooms, merge
from workers.group.errors import BatchOutage, postgres_outage, redis_outage

log = structlog.get_logger("workers.pipeline")

SHRINK_AFTER = 3  # outages of one batch before it is stored in smaller parts
WORKER_ERROR_RETRIES = 300  # a batch failing in the worker's own code is held this many times (~10 min)

Entry = tuple[bytes, dict[bytes, bytes] | None]


@dataclass(slots=True)
class Totals:
    batches: int = 0
    entries: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0


@dataclass(slots=True)
class Batch:
    """Entries read from one partition, and how far they got."""

    partition: int
    stream: str
    entries: list[Entry]
    tracked: bool = False  # read from the backlog: attempts are counted
    started: float = field(default_factory=time.perf_counter)
    # stages done
    good: list[Envelope] | None = None
    stream_ids: dict[UUID, bytes] = field(default_factory=dict)
    dead: list[Dead] = field(default_factory=list)
    result: store.BatchResult | None = None
    dead_lettered: bool = False
    failures: int = 0  # outages met so far
    unrefunded: set[bytes] = field(default_factory=set)  # counted attempts an outage could not give back
    copies: list[tuple[Envelope, bytes]] = field(default_factory=list)  # an event read twice: its other entries

    @property
    def ids(self) -> list[bytes]:
        return [eid for eid, _ in self.entries]

    def entry_id(self, envelope: Envelope) -> bytes | None:
        """The entry ``envelope`` was decoded from: an event read twice has one per copy."""
        return next((eid for e, eid in self.copies if e is envelope), None) or self.stream_ids.get(envelope.event_id)

    def letter(self, envelope: Envelope, error: str, attempts: int = 1) -> Dead:
        """The dead letter of the entry ``envelope`` was decoded from: its fields as read."""
        eid = self.entry_id(envelope) or b""
        fields = next((f for i, f in self.entries if i == eid and f is not None), {})
        return Dead(eid, error, fields, attempts)


class Pipeline:
    def __init__(self, settings: Settings, redis: Redis, pg: asyncpg.Pool, enricher: Enricher | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.pg = pg  # the directory's, shard "default"
        # where each workspace's rows are: a batch is written to each shard it touches, and
        # what a shard cannot take waits in its workspace's room (workers.consumer.waiting)
        self.placement = placement.Placement.over(settings, pg)
        # what an ack must not outlive (a filing, a letter, a parked event): replicated first
        self.replicated = Replicated(redis, settings.ack_replicas, settings.ack_wait_ms)
        self.rooms = Rooms(redis, self.keys, self.placement, self.replicated)
        self.enricher = enricher
        self.arq: ArqRedis | None = None  # set by the arq worker; --drain leaves it to the sweep
        self.metrics: WorkerMetrics | None = None
        self.totals = Totals()
        # the erasures Postgres lost, put back before the first batch (each shard's before its first write)
        self.ledger = LedgerRestore(self.placement, redis, self.keys, self.rooms.sharded, self._held)
        # small batches of several partitions in one transaction (a batch's statements cost
        # what they cost whatever its size)
        self.combiner = Combiner(self._write, settings.batch_size, gather_s=settings.linger_ms / 1000)

    async def process(self, batch: Batch) -> None:
        """Take ``batch`` through its remaining stages. Raises ``BatchOutage`` when Postgres or
        Redis stopped it: call again with the same ``batch`` once the cause may be gone."""
        if batch.good is None:
            self._decode(batch)
        assert batch.good is not None
        if batch.result is None:
            todo = batch.good
            counted: list[bytes] = []
            if batch.tracked and todo:
                if batch.failures:
                    # Postgres failed this batch before: count no attempt until it answers, so
                    # a kill during a long outage is not charged to the entries
                    await self._postgres_answers()
                # past the limit: dead-lettered below, never attempted again
                batch.good = todo = await self._count_attempts(batch, todo, counted)
            try:
                result, failed = await self._store_chunked(todo, batch.failures, alone=batch.tracked)
                if (
                    len(todo) > 1
                    and len(failed) == len(todo)
                    and not any(isinstance(x, PostgresError) for _, x in failed)
                    and batch.failures < WORKER_ERROR_RETRIES
                ):
                    # every entry failed alone, and not for Postgres: the fault is the
                    # worker's own (a bug, a broken deploy), not each entry's. Nothing was
                    # committed; hold the batch for a while (a fixed worker may take it),
                    # then set its entries aside like any poison, each with its error
                    log.error(
                        "batch.worker_error", stream=batch.stream, entries=len(todo), **error_fields(failed[0][1])
                    )
                    raise BatchOutage("worker_error", failed[0][1])
            except BatchOutage:
                await self._refund(batch, counted)
                raise
            batch.dead.extend(batch.letter(e, f"store: {type(x).__name__}: {x}") for e, x in failed)
            batch.result = result
        if batch.dead and not batch.dead_lettered:
            await self._redis(dead_letters.write(self.replicated, self.keys, batch.stream, batch.dead))
            batch.dead_lettered = True
        await self._redis(self._ack(batch))
        self._done(batch, batch.result)
        await self.notify(batch.result)

    def _decode(self, batch: Batch) -> None:
        batch.good = []
        gone = 0
        for eid, fields in batch.entries:
            if not fields:
                # deleted while pending (a trim, or XDEL by an operator): Redis answers its id
                # with no fields (redis-py: an empty dict; no entry is ever added without
                # one), and nothing is left to store
                gone += 1
                continue
            try:
                envelope = wire.from_entry(fields)
                # past the bounds every door keeps (an older edge wrote it, or a replay of
                # the archive, or a foreign producer): what no later step may be asked to
                # write again (ingest.contract.bounds)
                bounds.check(envelope.payload)
            except Exception as exc:
                # poison, a foreign producer, or a bug: one entry in, one outcome out (the
                # letter keeps the entry's fields, as read). Whatever decoding raises is the
                # entry's own: it is pure computation on the entry's bytes, no I/O
                error = str(exc) if isinstance(exc, EnvelopeError | BoundsError) else f"{type(exc).__name__}: {exc}"
                batch.dead.append(Dead(eid, f"decode: {error}", fields))
                continue
            # the same event twice in one read (a requeued or spooled copy) goes to the store
            # as it is: stored once, counted once as a duplicate, both entries acked
            batch.good.append(envelope)
            if self.placement.sharded:
                self.rooms.fields[envelope.event_id] = fields  # as read: what a room would hold
            if envelope.event_id in batch.stream_ids:  # its copy: filed for an erasure's sweep (``erased.filed``)
                batch.copies.append((envelope, eid))
            else:  # the event's first entry (a copy's is its own: ``Batch.entry_id``)
                batch.stream_ids[envelope.event_id] = eid
        if gone:
            log.warning("entries.deleted_while_pending", stream=batch.stream, count=gone)

    async def _postgres_answers(self) -> None:
        try:
            async with asyncio.timeout(5):
                async with self.pg.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except Exception as exc:
            await self._raise_if_outage(exc)
            raise

    async def _raise_if_outage(self, exc: Exception) -> None:
        """``BatchOutage`` when ``exc`` says Postgres cannot serve anyone now, or a workspace
        of the batch is moving to another shard (``placement.Moved``: the batch waits for the
        switch, then goes where the directory says); else return."""
        if isinstance(exc, BatchOutage):
            raise exc
        if isinstance(exc, placement.Moved):
            await self.placement.fresh(since=time.monotonic())
            raise BatchOutage("workspace_moving", exc) from exc
        reason = postgres_outage(exc)
        if reason is not None:
            # the pool's idle connections may all be dead (a restart), still on the old host
            # or still read-only (settings read at connect), or hold statements prepared for
            # the old schema: the retry gets fresh ones
            for pool in await self._opened_pools():
                await pool.expire_connections()
            raise BatchOutage(reason, exc) from exc

    async def _count_attempts(self, batch: Batch, todo: list[Envelope], counted: list[bytes]) -> list[Envelope]:
        """One more attempt for each tracked entry (their ids added to ``counted``); those
        past the limit go to the dead letters instead of the transaction. Returns the rest.
        An attempt an earlier outage could not give back is this one (added 0, not 1)."""
        key = self.keys.attempts(batch.partition)
        ids = list(dict.fromkeys(batch.stream_ids[e.event_id] for e in todo))  # a copy: one count
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.execute_command("HINCRBY", key, eid, 0 if eid in batch.unrefunded else 1)
        try:
            counts = await pipe.execute()
        except Exception as exc:
            if redis_outage(exc) is None:
                raise
            # Redis full or away: attempt uncounted rather than stalled (a crash now is not
            # counted, the entry is simply tried again)
            log.warning("attempts.not_counted", stream=batch.stream, entries=len(ids), error=type(exc).__name__)
            return todo
        counted.extend(ids)
        batch.unrefunded.clear()
        limit = self.settings.max_deliveries
        keep: list[Envelope] = []
        by_id = dict(zip(ids, counts, strict=True))
        for e in todo:
            eid = batch.stream_ids[e.event_id]
            n = by_id[eid]
            if int(n) - 1 >= limit:
                batch.dead.append(
                    batch.letter(
                        e,
                        f"a worker stopped while processing it {int(n) - 1} times (limit {limit})",
                        attempts=int(n) - 1,
                    )
                )
                log.error("event.poison", event_id=str(e.event_id), attempts=int(n) - 1)
            else:
                keep.append(e)
        return keep

    async def _refund(self, batch: Batch, counted: list[bytes]) -> None:
        """An outage stopped the attempt: it was not the entries' doing."""
        if not counted:
            return
        pipe = self.redis.pipeline(transaction=False)
        for eid in counted:
            pipe.execute_command("HINCRBY", self.keys.attempts(batch.partition), eid, -1)
        try:
            await pipe.execute()
        except Exception as exc:
            batch.unrefunded.update(counted)  # the next attempt nets it out
            log.warning("attempts.not_refunded", stream=batch.stream, entries=len(counted), error=exc)

    async def _store_chunked(
        self, envelopes: list[Envelope], failures: int, *, alone: bool = False
    ) -> tuple[store.BatchResult, list[tuple[Envelope, Exception]]]:
        """The batch in one transaction, with other partitions' small batches where it is
        small, new and not ``alone`` (``workers.consumer.combine``); after repeated outages, in
        halves, quarters, ...: a batch too big for a statement timeout or a lock table must
        not be retried whole for ever (each part commits on its own, exactly once in effect)."""
        if not envelopes:
            return store.BatchResult(), []
        if not self.ledger.done:
            await self.ledger.all()
        if not failures and not alone and self.combiner.joinable(envelopes):
            combined = await self.combiner.store(envelopes)
            if combined is not None:
                return combined, []
            # the shared write failed: this batch alone, where its own errors are told apart
        size = len(envelopes) if failures < SHRINK_AFTER else max(1, len(envelopes) >> (failures - SHRINK_AFTER + 1))
        total, failed = store.BatchResult(), []
        for i in range(0, len(envelopes), size):
            r, f = await self._store(envelopes[i : i + size])
            merge(total, r)
            failed += f
        return total, failed

    async def _held(self, exc: Exception) -> None:
        """``BatchOutage`` for an outage of Postgres or Redis (the batch waits), else return."""
        await self._raise_if_outage(exc)
        await self._redis(_raising(exc))

    async def _opened_pools(self) -> list[asyncpg.Pool]:
        try:  # the directory itself down: its pool is the one to renew
            return list((await self.placement.pools()).values())
        except Exception:
            return [self.pg]

    async def _write(self, envelopes: list[Envelope]) -> store.BatchResult:
        """The batch in one transaction on each shard its workspaces are on, all at once
        (``workers.consumer.waiting``: what a shard cannot take waits in its rooms)."""
        if not await self.rooms.sharded():
            return await store.write_batch(self.pg, envelopes, self.enricher)
        return await self.rooms.write(envelopes, self._write_part)

    async def _write_part(self, shard: str, envelopes: list[Envelope]) -> store.BatchResult:
        if self.ledger.unrestored:
            await self.ledger.shard(shard)
        # on a shard of several, a workspace that moved away is never written where it was
        fence = sorted({e.workspace_id for e in envelopes if e.workspace_id})
        return await store.write_batch(await self.placement.pool_of(shard), envelopes, self.enricher, fence=fence)

    async def drain_rooms(self) -> int:
        """A page of each waiting room whose shard answers again (``Rooms.drain``); the
        events it stored."""
        result = await self.rooms.drain(self._write_part)
        await self.notify(result)
        return result.inserted + result.duplicates

    async def _store(self, envelopes: list[Envelope]) -> tuple[store.BatchResult, list[tuple[Envelope, Exception]]]:
        try:
            return await self._write(envelopes), []
        except Exception as exc:
            await self._raise_if_outage(exc)
            if len(envelopes) == 1:
                # the error's kind, not its text: a database error quotes the value it refused
                log.error("event.poison", event_id=str(envelopes[0].event_id), **error_fields(exc))
                return store.BatchResult(), [(envelopes[0], exc)]
        # isolate the poison: halves commit on their own, each exactly once in effect
        mid = len(envelopes) // 2
        total, failed = store.BatchResult(), []
        for half in (envelopes[:mid], envelopes[mid:]):
            r, f = await self._store(half)
            merge(total, r)
            failed += f
        return total, failed

    async def _redis(self, step: Any) -> None:
        try:
            await step
        except Exception as exc:
            reason = redis_outage(exc)
            if reason is None:
                raise
            if reason == "redis_readonly":
                # a replica now, after a failover behind the same address: pooled
                # connections would keep talking to it; reconnect
                pool = getattr(self.redis, "connection_pool", None)
                if pool is not None:
                    await pool.disconnect()
            raise BatchOutage(reason, exc) from exc

    async def _ack(self, batch: Batch) -> None:
        """Acked once ``erased.filed`` is, and at replicas:N once N replicas hold it
        (``ingest.contract.replicated``): never an entry acked and left unfiled (a full Redis
        that refused the filing, a failover that lost it and kept the ack, a worker killed
        between)."""
        await self.replicated.send(erased.filed(self.keys, batch))
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(batch.stream, GROUP, *batch.ids)
        if batch.tracked:
            pipe.execute_command("HDEL", self.keys.attempts(batch.partition), *batch.ids)
        await pipe.execute()

    def _done(self, batch: Batch, result: store.BatchResult) -> None:
        for e in batch.good or () if self.rooms.fields else ():
            self.rooms.fields.pop(e.event_id, None)
        self._log_skipped(result)
        self.totals.batches += 1
        self.totals.entries += len(batch.entries)
        self.totals.inserted += result.inserted
        self.totals.duplicates += result.duplicates
        self.totals.dead += len(batch.dead)
        seconds = time.perf_counter() - batch.started
        if self.metrics is not None:
            self.metrics.batch(len(batch.entries), result.inserted, result.duplicates, len(batch.dead), seconds)
        log.info(
            "batch",
            stream=batch.stream,
            entries=len(batch.entries),
            joined=result.joined,  # its events counted in the line of the batch it joined
            inserted=result.inserted,
            duplicates=result.duplicates,
            unknown=len(result.unknown_codes),
            refunds_not_restored=len(result.refunds_not_restored),
            dead=len(batch.dead),
            outages=batch.failures,
            ms=round(seconds * 1000, 2),
        )

    async def notify(self, result: store.BatchResult) -> None:
        """Webhook jobs for the outbox rows the batch committed. A failure here loses
        nothing: the rows are in Postgres and the sweep cron enqueues what is left."""
        if not result.deliveries or self.arq is None:
            return
        try:
            await webhooks.enqueue(self.arq, result.deliveries)
        except Exception as exc:
            log.warning("webhooks.enqueue_failed", deliveries=len(result.deliveries), error=exc)

    def _log_skipped(self, result: store.BatchResult) -> None:
        # the link cache is kept by the management writes, the refresh cron and the edge's
        # own refill after a fallback; the worker only says what it skipped
        for code, n in Counter(result.unknown_codes).items():
            log.warning("click.unknown_code", code=code[:128], events=n)
        for code, n in Counter(result.inactive_codes).items():
            log.warning("click.inactive_link", code=code, events=n)


async def _raising(exc: Exception) -> None:
    raise exc
