"""The event path: the ``workers`` group's member in each arq worker process, each batch it
reads taken through the pipeline (decode → store → commit → dead-letter → ack).

The loop itself (one reader per partition, own pending entries first, reclaim, claims kept
while a batch is in flight, hand-back on SIGTERM, outages waited out, state published) is
``workers/group``'s ``Member``, which the archiver shares. What is the consumer's own:

- One batch at a time per partition. A batch an outage stopped is held in memory and
  retried (``Pipeline.process`` resumes at the stage that failed), never read again from
  Redis; while Postgres is the cause no partition reads anything new (``Gate``).
- Entries read again from this consumer's own pending ones are *tracked* (each attempt
  counted, see ``Pipeline``), and those already in an unfinished tracked attempt are read
  one at a time, so that an entry that kills its worker fails alone.
- Housekeeping beside the member's: the trim (on its own timer, even while Postgres is
  out: under a full Redis it is what frees memory), Postgres partition maintenance, and
  the click_burst rule's windows past their time deleted (``workers.consumer.bursts``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from ingest.contract import layout
from ingest.contract.connections import Redis
from ingest.contract.keys import GROUP
from ingest.contract.settings import Settings
from workers.consumer import burst_pass, bursts, partitions, store, trim
from workers.consumer.pipeline import Batch, Pipeline
from workers.group import Chore, Entry, Member, Part, id_after, text
from workers.group.errors import BatchOutage
from workers.group.gate import Gate

log = structlog.get_logger("workers.consume")

# A batch costs about a dozen statements and a commit whatever its size, so under a steady
# trickle (each read returning a few entries) the worker and Postgres spent most of their
# CPU per batch, not per event, and took it from the edge on the same cores. A read that
# returns fewer than LINGER_BELOW entries waits ``REFSTREAM_LINGER_MS`` once, then takes
# what arrived meanwhile (no BLOCK) into the same batch. A full read, and so a drain or a
# backlog, never waits. Measured at a steady 2,000 events/s: worker CPU per event 245-280
# µs without, ~200 with 4 ms; Postgres's 175-205 µs, ~125; p50 +4 ms. That was before small
# batches of several partitions shared a transaction (``workers.consumer.combine``): now a
# batch read while a transaction is in flight waits for it in the combiner's queue anyway,
# and the linger there was only a second read and a timer more a batch, so a read lingers
# only while its Postgres writes nothing (docs/benchmarks.md, "A read lingers only ...").
#
# Under a steady load the partitions are read together on a tick (``REFSTREAM_READ_INTERVAL_MS``,
# 10 ms; ``Member``'s ``interval_s``): each read that found some entries is followed by the
# next on the next multiple of the tick, so the partitions' batches come back at once and
# the combiner's gather puts them in one transaction. Read as soon as its batch was stored,
# each partition's came back a little apart from the others', and a worker at full load
# committed about 110 events a transaction; on the tick, about 200, for 22 % less of the
# worker's and Postgres's CPU a stored click (docs/benchmarks.md, "Partitions read on a tick").
LINGER_BELOW = 32
RETIRE_EVERY_S = 2.0  # how often a retiring partition is looked at (empty: retired)
# how often the click_burst windows past their time go: a window is a minute by default, so
# the table holds about the pairs of the last window and a half
WINDOWS_EVERY_S = 30.0
DRAIN_ROOMS_S = 60.0  # work --drain: the longest it waits for rooms another worker drains
WAITING_EVERY_S = 1.0  # a waiting room's events tried again on their shard (workers.consumer.waiting)


class Consumer:
    """The ``workers`` group's member in one worker process (``name``): its parts store
    batches through ``pipeline``; its chores trim the streams and keep Postgres's partitions."""

    def __init__(self, settings: Settings, redis: Redis, pipeline: Pipeline, *, name: str) -> None:
        self.settings = settings
        self.redis = redis
        self.pipeline = pipeline
        self.name = name
        self.member = Member(
            settings,
            redis,
            group=GROUP,
            name=name,
            part=self._part,
            role="consumer",
            reclaim_count=settings.batch_size,
            linger=(LINGER_BELOW, settings.linger_ms / 1000) if settings.linger_ms > 0 else None,
            lingers=lambda: not self.pipeline.combiner.busy,
            interval_s=settings.read_interval_ms / 1000,
            chores=[
                Chore("trim", settings.trim_every_s, self._trim),
                Chore("memory", settings.trim_every_s, self._warn_memory),
                Chore("partitions", settings.partition_every_s, self._partitions, needs_postgres=True),
                Chore("retire", RETIRE_EVERY_S, self._retire),
                Chore("windows", WINDOWS_EVERY_S, self._windows, needs_postgres=True),
                Chore("bursts", burst_pass.PASS_EVERY_S, self._bursts, needs_postgres=True),
                Chore("waiting", WAITING_EVERY_S, self._waiting),
            ],
            totals=lambda: vars_of(pipeline.totals),
            on_gate=self._gate_changed,
        )
        self.keys = self.member.keys  # sized by the layout the member reads

    async def run(self, *, drain: bool = False) -> None:
        """Consume every partition until ``stop()``; with ``drain``, until the group has
        read and acked everything in every partition."""
        # a small batch from idle waits for one from each partition read (at most the linger)
        self.pipeline.combiner.expect = lambda: max(1, len(self.member.parts))
        await self.member.run(drain=drain)
        # the clicks this member's last batches stored, judged now rather than by the next
        # pass of another worker (a drain leaves none behind); an outage leaves them to it
        try:
            await self._bursts(passes=burst_pass.DRAIN_PASSES if drain else burst_pass.PASSES_A_TICK)
        except Exception as exc:
            log.warning("bursts.pass_left", error=exc)
        if drain:  # the waiting rooms too, while their shards take them (another worker may hold one)
            for _ in range(int(DRAIN_ROOMS_S / 0.2)):
                if await self._waiting():
                    continue
                if not await self.pipeline.rooms.waiting():
                    break
                await asyncio.sleep(0.2)  # a room another worker holds: polled, bounded

    def stop(self) -> None:
        """Stop reading; each reader finishes the batch in flight (commit, ack) and returns
        within one block time. A batch held by an outage, or unfinished after
        ``REFSTREAM_DRAIN_TIMEOUT_S``, is handed back instead."""
        self.member.stop()

    def _part(self, p: int, stream: str) -> Part:
        return _Batches(self, p, stream)

    async def _trim(self) -> None:
        s = self.settings
        await trim.trim(
            self.redis,
            self.keys,
            s.stream_retention_s,
            s.stream_max_bytes,
            skew_max_s=s.clock_skew_max_s,
            retiring=self.member.watch.layout.retiring,
        )

    async def _retire(self) -> None:
        """Retire the retiring partitions that are empty (``ingest.contract.layout``)."""
        s = self.settings
        if self.member.watch.layout.retiring:
            await layout.retire(
                self.redis,
                self.keys,
                s.partitions,
                replicas=s.ack_replicas,
                wait_ms=s.ack_wait_ms,
            )

    async def _warn_memory(self) -> None:
        await trim.warn_memory(self.redis, self.settings.memory_warn_ratio)

    async def _partitions(self) -> None:
        s = self.settings
        # each of these chores on every shard, past one that fails (``Placement.each``)
        await self.pipeline.placement.each(
            lambda pool: partitions.maintain(
                pool,
                retention_days=s.event_retention_days,
                dedupe_days=s.dedupe_retention_days,
                skew_max_s=s.clock_skew_max_s,
                webhook_days=s.webhook_retention_days,
            ),
            every=True,
        )

    async def _bursts(self, passes: int = burst_pass.PASSES_A_TICK) -> None:
        """The click_burst rule over the clicks committed since the last pass
        (``workers.consumer.burst_pass``); their notices' webhook jobs after its commit."""
        done, failed = await self.pipeline.placement.settled(lambda _, pool: burst_pass.run_until_done(pool, passes))
        deliveries = [d for passed in done.values() for p in passed for d in p.deliveries]
        if deliveries:  # the shards that passed: their notices' jobs, whatever another's did
            await self.pipeline.notify(store.BatchResult(deliveries=deliveries))
        if failed is not None:
            raise failed

    async def _waiting(self) -> int:
        """The waiting rooms of shards that answer again (``workers.consumer.waiting``)."""
        return await self.pipeline.drain_rooms()

    async def _windows(self) -> None:
        async def prune(pool: asyncpg.Pool) -> None:
            async with pool.acquire() as conn:
                await bursts.prune(conn)

        await self.pipeline.placement.each(prune, every=True)

    def _gate_changed(self, gate: Gate) -> None:
        if self.pipeline.metrics is not None:
            self.pipeline.metrics.set_blocked(gate.reasons)


class _Batches(Part):
    """One partition's batch: read, then through the pipeline, which acks it."""

    def __init__(self, consumer: Consumer, p: int, stream: str) -> None:
        self.c, self.p, self.stream = consumer, p, stream
        self.batch: Batch | None = None

    def room(self) -> int:
        return 0 if self.batch is not None else self.c.settings.batch_size

    def take(self, entries: list[Entry], again: bool) -> None:
        if entries:
            self.batch = Batch(self.p, self.stream, entries, tracked=again)

    def held(self) -> list[str]:
        return [] if self.batch is None else [text(i) for i in self.batch.ids]

    async def settle(self) -> None:
        assert self.batch is not None
        try:
            await self.c.pipeline.process(self.batch)
        except BatchOutage:
            self.batch.failures += 1
            raise
        self.batch = None

    async def backlog_count(self, after: str, count: int) -> int:
        """The run of pending entries that never were in an unfinished attempt, or the
        first one alone: an entry that kills its worker then fails alone, and every entry
        around it commits."""
        start = "-" if after == "0" else id_after(after)
        pending = await self.c.redis.xpending_range(
            self.stream, GROUP, min=start, max="+", count=count, consumername=self.c.name
        )
        if not pending:
            return count
        ids = [e["message_id"] for e in pending]
        attempts = await self.c.redis.execute_command("HMGET", self.c.keys.attempts(self.p), *ids)
        return next((i for i, a in enumerate(attempts) if a is not None and int(a) > 0), len(ids)) or 1


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}
