"""The XREADGROUP loop: one reader per stream partition, inside the arq worker process.

Each partition is read by its own task with its own XREADGROUP (a multi-stream read would
be a cross-slot command on a Redis Cluster). A reader first re-reads its consumer's own
pending entries (id ``0``: what a previous run of this consumer read and never acked, or
what ``reclaim`` claimed from a dead consumer), then blocks for new ones (id ``>``).

Outages are waited out, never counted against the entries: a batch an outage stopped is
held in memory and retried with a backoff (``Pipeline.process`` resumes at the stage that
failed), and while Postgres is the cause no partition reads anything new (``Gate``). The
held entries stay claimed by this consumer (XCLAIM JUSTID refreshes their idle time
without counting a delivery), so no other worker takes them over meanwhile. On SIGTERM a
held batch is handed back: marked idle for long, so the next reclaim by any worker takes
it at once.

Housekeeping (reclaiming what dead consumers left, trimming, publishing this worker's
state) runs here on its own timers: it never waits behind arq's job queue.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.connections import Redis
from ingest.keys import GROUP, Keys, parse_id
from ingest.settings import Settings

from . import partitions, presence, trim
from .errors import Outage, redis_outage
from .gate import Gate
from .pipeline import Batch, Entry, Pipeline

log = structlog.get_logger("workers.consume")

HAND_BACK_IDLE_MS = 10**12  # "idle since forever": any reclaim takes it

# A batch costs about a dozen statements and a commit whatever its size, so under a steady
# trickle (each read returning a few entries) the worker and Postgres spent most of their
# CPU per batch, not per event, and took it from the edge on the same cores. A read that
# returns fewer than LINGER_BELOW entries waits LINGER_S once, then takes what arrived
# meanwhile (no BLOCK) into the same batch. A full read, and so a drain or a backlog,
# never waits. Measured at a steady 2,000 events/s: worker CPU per event 245-280 µs
# without, ~200 with; Postgres's 175-205 µs, ~125; p50 +4 ms.
LINGER_BELOW = 32
LINGER_S = 0.004


class Backoff:
    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.cap, self.delay * 2)


class Consumer:
    def __init__(self, settings: Settings, redis: Redis, pipeline: Pipeline, *, name: str) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.pipeline = pipeline
        self.name = name
        self.gate = Gate(on_change=self._gate_changed)
        self._backlog = [True] * settings.partitions
        self._stopping = False
        self._publish_now = asyncio.Event()

    async def ensure_groups(self) -> None:
        """Create the group on every partition; from id 0, so entries the edge appended
        before any worker ever ran are consumed too. A full (or read-only) Redis refuses
        the creation even when the group exists: then it is enough that it exists."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    continue
                if redis_outage(exc) in ("redis_oom", "redis_readonly") and await self._group_exists(stream):
                    continue
                raise

    async def _group_exists(self, stream: str) -> bool:
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return False  # no such key
        return any(_str(g["name"]) == GROUP for g in groups)

    async def run(self, *, drain: bool = False) -> None:
        """Consume every partition until ``stop()``; with ``drain``, until the group has
        read and acked everything in every partition."""
        backoff = Backoff(first=0.5, cap=5.0)
        waiting: str | None = None
        while True:
            try:
                await self.ensure_groups()
                break
            except Exception as exc:
                reason = redis_outage(exc)
                if reason is None:
                    raise
                if reason != waiting:  # one line per state, not per retry
                    log.warning("redis.unavailable", reason=reason, error=repr(exc))
                    waiting = reason
                if self._stopping:
                    return
                await backoff.sleep()
        log.info("consumer.start", consumer=self.name, partitions=self.settings.partitions, drain=drain)
        readers = [asyncio.create_task(self._partition(p, drain)) for p in range(self.settings.partitions)]
        housekeeping = None if drain else asyncio.create_task(self._housekeeping())
        try:
            await asyncio.gather(*readers)
        except BaseException:
            # a reader died of a bug: the others finish their batch (or hand it back) before
            # the process exits for a restart, rather than have their pools closed under them
            self._stopping = True
            await asyncio.gather(*readers, return_exceptions=True)
            raise
        finally:
            if housekeeping is not None:
                housekeeping.cancel()
                await asyncio.gather(housekeeping, return_exceptions=True)
        await self._leave()
        log.info("consumer.stop", consumer=self.name, **vars_of(self.pipeline.totals))

    def stop(self) -> None:
        """Stop reading; each reader finishes the batch in flight (commit, ack) and returns
        within one block time. A batch held by an outage is handed back instead."""
        self._stopping = True

    # -- one partition ----------------------------------------------------------------

    async def _partition(self, p: int, drain: bool) -> None:
        stream = self.keys.stream(p)
        backoff = Backoff()
        read_failure: str | None = None
        held: Batch | None = None
        while True:
            if held is None:
                if self._stopping:
                    return
                if self.gate.closed:  # Postgres is out: reading more would only pile up entries
                    await self.gate.wait_open(self.settings.block_ms / 1000)
                    continue
                try:
                    held = await self._read(p, stream)
                    if held is None and drain and not self._backlog[p] and await self._drained(stream):
                        return
                    if read_failure is not None:
                        log.info("consume.read_resumed", stream=stream)
                        read_failure = None
                except Exception as exc:
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        failure = await self._recreate_groups()  # the stream was deleted under us
                        if failure is None:
                            continue
                        exc = failure
                    reason = redis_outage(exc) or "error"
                    if reason != read_failure:
                        log.warning("consume.read_failed", stream=stream, reason=reason, error=repr(exc))
                        read_failure = reason
                    self._backlog[p] = True  # a read may have been delivered and its reply lost
                    await backoff.sleep()
                    continue
                if held is None:
                    backoff.reset()
                    continue
            try:
                await self._process_claimed(held)
            except Outage as exc:
                held.failures += 1
                self.gate.block(p, exc.reason)
                if self._stopping:
                    await self._hand_back(held)
                    self.gate.clear(p)
                    return
                await backoff.sleep()
                continue
            held = None
            backoff.reset()
            self.gate.clear(p)

    async def _recreate_groups(self) -> Exception | None:
        try:
            await self.ensure_groups()
        except Exception as exc:
            return exc
        return None

    async def _process_claimed(self, batch: Batch) -> None:
        """``Pipeline.process``, keeping the entries claimed while it runs: an attempt that
        outlasts ``claim_idle_ms`` (a blackholed Postgres, a long lock wait) must not let
        another worker take the same entries meanwhile."""
        every = self.settings.claim_idle_ms / 3000
        attempt = asyncio.ensure_future(self.pipeline.process(batch))
        try:
            while True:
                done, _ = await asyncio.wait({attempt}, timeout=every)
                if done:
                    return attempt.result()
                await self._keep_claimed(batch)
        except BaseException:
            attempt.cancel()
            raise

    async def _read(self, p: int, stream: str) -> Batch | None:
        if self._backlog[p]:
            return await self._read_backlog(p, stream)
        size = self.settings.batch_size
        reply = await self.redis.xreadgroup(GROUP, self.name, {stream: ">"}, count=size, block=self.settings.block_ms)
        entries: list[Entry] = reply[0][1] if reply else []
        if not entries:
            return None
        if len(entries) < min(LINGER_BELOW, size) and not self._stopping:
            await asyncio.sleep(LINGER_S)
            more = await self.redis.xreadgroup(GROUP, self.name, {stream: ">"}, count=size - len(entries))
            entries += more[0][1] if more else []
        return Batch(p, stream, entries)

    async def _read_backlog(self, p: int, stream: str) -> Batch | None:
        """This consumer's pending entries: what it read before and never acked, or claimed
        from a dead consumer. They are tracked (each attempt counted, see ``Pipeline``).
        Entries that were already in an unfinished tracked attempt are read one at a time,
        so that an entry that kills its worker fails alone and every entry around it commits.
        """
        pending = await self.redis.xpending_range(
            stream, GROUP, min="-", max="+", count=self.settings.batch_size, consumername=self.name
        )
        if not pending:
            self._backlog[p] = False
            return None
        ids = [e["message_id"] for e in pending]
        attempts = await self.redis.execute_command("HMGET", self.keys.attempts(p), *ids)
        # the run of entries that never were in an unfinished attempt, or the first one alone
        count = next((i for i, a in enumerate(attempts) if a is not None and int(a) > 0), len(ids)) or 1
        reply = await self.redis.xreadgroup(GROUP, self.name, {stream: "0"}, count=count)
        entries: list[Entry] = reply[0][1] if reply else []
        if not entries:
            self._backlog[p] = False
            return None
        return Batch(p, stream, entries, tracked=True)

    async def _keep_claimed(self, batch: Batch) -> None:
        """Reset the held entries' idle time (JUSTID: no delivery is counted), so that no
        other worker's reclaim takes them while this one waits out the outage."""
        try:
            await self.redis.xclaim(batch.stream, GROUP, self.name, 0, list[Any](batch.ids), justid=True)
        except Exception as exc:
            log.debug("claim_refresh_failed", stream=batch.stream, error=repr(exc))

    async def _hand_back(self, batch: Batch) -> None:
        """Stopping with a batch an outage holds: leave it pending, marked idle for ever,
        so the next reclaim (by any worker) takes it without waiting out ``claim_idle_ms``."""
        self._backlog[batch.partition] = True
        try:
            await self.redis.xclaim(
                batch.stream, GROUP, self.name, 0, list[Any](batch.ids), idle=HAND_BACK_IDLE_MS, justid=True
            )
        except Exception as exc:
            log.warning("hand_back_failed", stream=batch.stream, error=repr(exc))
        log.info("batch.handed_back", stream=batch.stream, entries=len(batch.entries))

    async def _drained(self, stream: str) -> bool:
        """Everything appended has been delivered and acked, by anyone. Entries pending in
        another consumer are claimed once idle long enough (that consumer may be dead)."""
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if _str(g["name"]) == GROUP), None)
        if group is None:
            return False
        if group["pending"]:
            await self.reclaim()
            return False
        info = await self.redis.xinfo_stream(stream)
        return parse_id(group["last-delivered-id"]) >= parse_id(info["last-generated-id"])

    # -- housekeeping -----------------------------------------------------------------

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``claim_idle_ms`` in other (dead) consumers; the
        backlog read then takes them (tracked: see ``Pipeline``)."""
        claimed = 0
        for p, stream in enumerate(self.keys.streams):
            start = "0-0"
            for _ in range(1000):  # a bound, for a group with an enormous dead backlog
                reply = await self.redis.xautoclaim(
                    stream,
                    GROUP,
                    self.name,
                    min_idle_time=self.settings.claim_idle_ms,
                    start_id=start,
                    count=self.settings.batch_size,
                )
                if reply[1]:
                    self._backlog[p] = True
                    claimed += len(reply[1])
                start = _str(reply[0])
                if start == "0-0":
                    break
        if claimed:
            log.info("reclaimed", consumer=self.name, entries=claimed)
        return claimed

    async def _housekeeping(self) -> None:
        """Reclaim, trim, partition maintenance and publish state on their own timers, each failure logged and
        survived. Reclaiming waits while Postgres is out (nothing could be processed);
        trimming does not (under a full Redis it is what frees memory)."""
        next_reclaim = next_trim = next_state = next_partitions = 0.0
        while True:
            now = time.monotonic()
            if now >= next_reclaim:
                next_reclaim = now + self.settings.reclaim_every_s
                # not while Postgres is out (nothing could be processed), nor once stopping
                # (it would take back what was just handed back)
                if not self.gate.closed and not self._stopping:
                    await self._safely("reclaim", self.reclaim())
            if now >= next_trim:
                next_trim = now + self.settings.trim_every_s
                retention, budget = self.settings.stream_retention, self.settings.stream_max_bytes
                await self._safely("trim", trim.trim(self.redis, self.keys, retention, budget))
                await self._safely("memory", trim.warn_memory(self.redis, self.settings.memory_warn_ratio))
            if now >= next_partitions and not self.gate.closed:
                next_partitions = now + self.settings.partition_every_s
                await self._safely("partitions", self._partitions())
            if now >= next_state or self._publish_now.is_set():
                self._publish_now.clear()
                next_state = now + presence.EVERY_S
                await self._safely("state", self._publish_state())
            wake = min(next_reclaim, next_trim, next_state, next_partitions) - time.monotonic()
            try:
                await asyncio.wait_for(self._publish_now.wait(), max(0.05, wake))
            except TimeoutError:
                pass

    async def _partitions(self) -> None:
        s = self.settings
        await partitions.maintain(self.pipeline.pg, retention_days=s.event_retention, dedupe_days=s.dedupe_retention)

    async def _safely(self, what: str, step: Any) -> None:
        try:
            await step
        except Exception as exc:
            log.warning("housekeeping.failed", task=what, error=repr(exc))

    def state(self) -> dict[str, Any]:
        return {
            "consumer": self.name,
            "state": "blocked" if self.gate.blocked else "running",
            "reasons": self.gate.reasons,
            "since": self.gate.since,
            **vars_of(self.pipeline.totals),
        }

    def _gate_changed(self, gate: Gate) -> None:
        if self.pipeline.metrics is not None:
            self.pipeline.metrics.set_blocked(gate.reasons)
        self._publish_now.set()

    async def _publish_state(self) -> None:
        await presence.publish(self.redis, self.keys, self.name, self.state())

    async def _leave(self) -> None:
        """A clean stop: remove this worker's state, and its consumer from the group where
        it holds nothing (names are per process: they would pile up)."""
        try:
            await presence.forget(self.redis, self.keys, self.name)
            for stream in self.keys.streams:
                consumers = await self.redis.xinfo_consumers(stream, GROUP)
                mine = next((c for c in consumers if _str(c["name"]) == self.name), None)
                if mine is not None and int(mine["pending"]) == 0:
                    await self.redis.xgroup_delconsumer(stream, GROUP, self.name)
        except Exception as exc:
            log.warning("consumer.leave_failed", error=repr(exc))


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}
