"""One batch, top to bottom: decode → store (one transaction) → COMMIT → XACK.

Ack after commit, always: a crash between the two redelivers the batch, and the store
makes the second pass a no-op. The opposite order would lose events on a crash.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from arq.connections import ArqRedis

from ingest.connections import Redis
from ingest.events import FIELD, Envelope, EnvelopeError
from ingest.keys import GROUP, Keys
from ingest.settings import Settings

from . import store, webhooks
from .enrich import Enricher
from .errors import is_transient
from .metrics import WorkerMetrics

log = structlog.get_logger("workers.pipeline")

Entry = tuple[bytes, dict[bytes, bytes] | None]


@dataclass(slots=True)
class Totals:
    batches: int = 0
    entries: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0


class Pipeline:
    def __init__(self, settings: Settings, redis: Redis, pg: asyncpg.Pool, enricher: Enricher | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.pg = pg
        self.enricher = enricher
        self.arq: ArqRedis | None = None  # set by the arq worker; --drain leaves it to the sweep
        self.metrics: WorkerMetrics | None = None
        self.totals = Totals()

    async def process(self, stream: str, entries: list[Entry]) -> None:
        """Store and ack one batch read from ``stream``. Transient errors propagate (the
        entries stay pending and are read again); a batch Postgres refuses for its data
        is split until the culprit is found and dead-lettered."""
        start = time.perf_counter()
        ids = [eid for eid, _ in entries]
        good: list[Envelope] = []
        stream_ids: dict[UUID, bytes] = {}
        dead: list[tuple[bytes, bytes, str]] = []
        for eid, fields in entries:
            raw = (fields or {}).get(FIELD)
            if raw is None:
                continue  # trimmed while pending (XREADGROUP returns no fields): nothing to do
            try:
                envelope = Envelope.decode(raw)
            except EnvelopeError as exc:
                dead.append((eid, raw, f"decode: {exc}"))
                continue
            good.append(envelope)
            stream_ids[envelope.event_id] = eid

        result = store.BatchResult()
        fault = self.settings.fault or ""
        if fault.startswith("crash_on:") and any(e.payload.get("code") == fault[9:] for e in good):
            os.kill(os.getpid(), signal.SIGKILL)  # test-only failpoint: a poison entry that kills workers
        if good:
            result, failed = await self._store(good)
            dead.extend((stream_ids[e.event_id], e.encode(), err) for e, err in failed)
        if self.settings.fault == "crash_after_commit":
            os.kill(os.getpid(), signal.SIGKILL)  # test-only failpoint: committed, not acked
        if dead:
            await self._dead_letter(stream, dead)
        await self.redis.xack(stream, GROUP, *ids)
        self._log_skipped(result)
        await self._notify(result)

        self.totals.batches += 1
        self.totals.entries += len(entries)
        self.totals.inserted += result.inserted
        self.totals.duplicates += result.duplicates
        self.totals.dead += len(dead)
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.batch(len(entries), result.inserted, result.duplicates, len(dead), seconds)
        log.info(
            "batch",
            stream=stream,
            entries=len(entries),
            inserted=result.inserted,
            duplicates=result.duplicates,
            unknown=len(result.unknown_codes),
            dead=len(dead),
            ms=round((time.perf_counter() - start) * 1000, 2),
        )

    async def _store(self, envelopes: list[Envelope]) -> tuple[store.BatchResult, list[tuple[Envelope, str]]]:
        try:
            return await store.write_batch(self.pg, envelopes, self.enricher), []
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(envelopes) == 1:
                log.error("event.poison", event_id=str(envelopes[0].event_id), error=repr(exc))
                return store.BatchResult(), [(envelopes[0], f"store: {type(exc).__name__}: {exc}")]
        # isolate the poison: halves commit on their own, each exactly once in effect
        mid = len(envelopes) // 2
        total, failed = store.BatchResult(), []
        for half in (envelopes[:mid], envelopes[mid:]):
            r, f = await self._store(half)
            total.inserted += r.inserted
            total.duplicates += r.duplicates
            total.unknown_codes += r.unknown_codes
            total.inactive_codes += r.inactive_codes
            total.deliveries += r.deliveries
            failed += f
        return total, failed

    async def _dead_letter(
        self, stream: str, dead: list[tuple[bytes, bytes, str]], deliveries: dict[bytes, int] | None = None
    ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for eid, raw, error in dead:
            fields: dict[Any, Any] = {
                "stream": stream,
                "id": eid,
                "error": error[:1000],
                "deliveries": (deliveries or {}).get(eid, 1),
                "at": int(time.time() * 1000),
                FIELD: raw,
            }
            pipe.xadd(self.keys.dead, fields)
        await pipe.execute()
        log.warning("dead_letter", stream=stream, count=len(dead))

    async def dead_letter_redelivered(self, stream: str, entries: list[tuple[bytes, int]], limit: int) -> None:
        """Entries delivered more than ``limit`` times: to the dead-letter stream, then acked."""
        dead = []
        for eid, times in entries:
            found = await self.redis.xrange(stream, min=eid, max=eid)
            raw = found[0][1].get(FIELD, b"") if found and found[0][1] else b""
            dead.append((eid, raw, f"delivered {times} times without an ack (limit {limit})"))
        await self._dead_letter(stream, dead, deliveries={eid: times for eid, times in entries})
        await self.redis.xack(stream, GROUP, *[eid for eid, _ in entries])
        self.totals.dead += len(entries)

    async def _notify(self, result: store.BatchResult) -> None:
        """Webhook jobs for the outbox rows the batch committed. A failure here loses
        nothing: the rows are in Postgres and the sweep cron enqueues what is left."""
        if not result.deliveries or self.arq is None:
            return
        try:
            await webhooks.enqueue(self.arq, result.deliveries)
        except Exception as exc:
            log.warning("webhooks.enqueue_failed", deliveries=len(result.deliveries), error=repr(exc))

    def _log_skipped(self, result: store.BatchResult) -> None:
        # the link cache is kept by the management writes, the refresh cron and the edge's
        # own refill after a fallback; the worker only says what it skipped
        for code, n in Counter(result.unknown_codes).items():
            log.warning("click.unknown_code", code=code[:128], events=n)
        for code, n in Counter(result.inactive_codes).items():
            log.warning("click.inactive_link", code=code, events=n)
