"""The XREADGROUP loop: one reader per stream partition, inside the arq worker process.

Each partition is read by its own task with its own XREADGROUP (a multi-stream read would
be a cross-slot command on a Redis Cluster). A reader first re-reads its consumer's own
pending entries (id ``0``: what a previous run of this consumer read and never acked, or
what ``reclaim`` claimed from a dead consumer), then blocks for new ones (id ``>``).
While Redis or Postgres is down it backs off and tries again: it never exits, never spins.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.connections import Redis
from ingest.keys import GROUP, Keys
from ingest.settings import Settings

from .errors import is_transient
from .pipeline import Entry, Pipeline

log = structlog.get_logger("workers.consume")


class Backoff:
    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.cap, self.delay * 2)


def _stream_id(raw: Any) -> tuple[int, int]:
    s = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class Consumer:
    def __init__(self, settings: Settings, redis: Redis, pipeline: Pipeline, *, name: str) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.pipeline = pipeline
        self.name = name
        self._backlog = [True] * settings.partitions
        self._stopping = False

    async def ensure_groups(self) -> None:
        """Create the group on every partition; from id 0, so entries the edge appended
        before any worker ever ran are consumed too."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, *, drain: bool = False) -> None:
        """Consume every partition until ``stop()``; with ``drain``, until the group has
        read and acked everything in every partition."""
        backoff = Backoff()
        while True:
            try:
                await self.ensure_groups()
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("redis.unavailable", error=repr(exc))
                await backoff.sleep()
        log.info("consumer.start", consumer=self.name, partitions=self.settings.partitions, drain=drain)
        await asyncio.gather(*(self._partition(p, drain) for p in range(self.settings.partitions)))
        log.info("consumer.stop", consumer=self.name, **vars_of(self.pipeline.totals))

    def stop(self) -> None:
        """Stop reading; each reader finishes the batch in flight (commit, ack) and returns
        within one block time."""
        self._stopping = True

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``claim_idle_ms`` in other (dead) consumers."""
        claimed = 0
        for p, stream in enumerate(self.keys.streams):
            reply = await self.redis.xautoclaim(
                stream,
                GROUP,
                self.name,
                min_idle_time=self.settings.claim_idle_ms,
                start_id="0-0",
                count=self.settings.batch_size,
            )
            n = len(reply[1])
            if n:
                self._backlog[p] = True
                claimed += n
        if claimed:
            log.info("reclaimed", consumer=self.name, entries=claimed)
        return claimed

    async def _partition(self, p: int, drain: bool) -> None:
        stream = self.keys.stream(p)
        backoff = Backoff()
        while not self._stopping:
            try:
                entries = await self._read(p, stream)
                if entries:
                    await self.pipeline.process(stream, entries)
                elif drain and not self._backlog[p] and await self._drained(p, stream):
                    return
                backoff.reset()
            except Exception as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    await self.ensure_groups()  # the stream was deleted under us
                    continue
                if is_transient(exc):
                    log.warning("consume.unavailable", stream=stream, error=repr(exc))
                else:
                    log.exception("consume.failed", stream=stream)
                self._backlog[p] = True  # the batch is still pending: read it again
                await backoff.sleep()

    async def _read(self, p: int, stream: str) -> list[Entry]:
        if self._backlog[p]:
            return await self._read_backlog(p, stream)
        reply = await self.redis.xreadgroup(
            GROUP, self.name, {stream: ">"}, count=self.settings.batch_size, block=self.settings.block_ms
        )
        return reply[0][1] if reply else []

    async def _read_backlog(self, p: int, stream: str) -> list[Entry]:
        """This consumer's pending entries: what it read before and never acked.

        An entry delivered more than ``max_deliveries`` times is dead-lettered and acked: it
        keeps killing whoever reads it. Once any pending entry has been delivered before,
        the backlog is read one entry at a time, so that a poison entry fails alone and every
        entry around it commits (re-reading history counts as a delivery, so it is only done
        for the entry about to be processed).
        """
        pending = await self.redis.xpending_range(
            stream, GROUP, min="-", max="+", count=self.settings.batch_size, consumername=self.name
        )
        if not pending:
            self._backlog[p] = False
            return []
        limit = self.settings.max_deliveries
        poison = [(e["message_id"], e["times_delivered"]) for e in pending if e["times_delivered"] > limit]
        if poison:
            await self.pipeline.dead_letter_redelivered(stream, poison, limit)
            return []
        suspect = any(e["times_delivered"] > 1 for e in pending)
        reply = await self.redis.xreadgroup(
            GROUP, self.name, {stream: "0"}, count=1 if suspect else self.settings.batch_size
        )
        entries: list[Entry] = reply[0][1] if reply else []
        if not entries:
            self._backlog[p] = False
        return entries

    async def _drained(self, p: int, stream: str) -> bool:
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
        return _stream_id(group["last-delivered-id"]) >= _stream_id(info["last-generated-id"])


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}
