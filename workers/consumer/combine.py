"""Small batches of several partitions, stored together in one transaction.

Each partition's reader stores its own batch (``workers.consumer.pipeline``). Under a steady
load every read is small (a few entries per partition per linger), and a transaction costs
about a dozen statements and a commit whatever its size: measured on seed 000 clicks, about
2.3 ms of Postgres's CPU and 2.2 ms of the worker's a batch, beside some 50 µs of each an
event (``python -m bench.batch_cost``). So while one small batch is being stored, the small
batches the other partitions bring meanwhile wait, then go in the next transaction
together: as the edge's micro-batcher does with Redis, batches grow with the load, and an
idle worker adds no delay.

What it leaves as it was:

- **Exactly once.** The batches stored together are one transaction; each partition acks
  its own entries after it commits, as before. A crash between the commit and an ack
  redelivers entries that insert nothing.
- **Poison.** A write of several batches that fails, for whatever reason, is tried again by
  each batch alone on the pipeline's own path (an outage raised there, a poison entry
  isolated there by halves), so no entry's failure is ever another batch's.
- **What is stored alone, and in parallel with the rest:** a batch read from the backlog
  (tracked: an entry in it may kill its worker, and must fail alone), a batch that met an
  outage, and a batch of at least half of ``REFSTREAM_BATCH_SIZE`` (a drain's full reads,
  which gain nothing from company).

From idle, the first small batch waits up to ``REFSTREAM_LINGER_MS`` (as a short read does)
for the batches of the other partitions this worker reads, which are usually a few
milliseconds behind it (each read lingers on its own), and stops waiting as soon as one has
come from each, or enough to fill half a transaction; between transactions nothing waits
(what queued meanwhile goes at once). Under a steady load the partitions are read together
on the worker's tick (``REFSTREAM_READ_INTERVAL_MS``: ``workers.consumer.consume``), so
their batches arrive within that gather and share one transaction.

The first batch of a transaction gets its counts (inserted, duplicates, webhook deliveries,
...); the others get empty ones that say whose they joined (``BatchResult.joined``): the
totals add up, and each event is counted in one batch's line.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from ingest.contract.events import Envelope
from workers.consumer.store import BatchResult

Write = Callable[[list[Envelope]], Awaitable[BatchResult]]


@dataclass(slots=True)
class _Ask:
    envelopes: list[Envelope]
    done: asyncio.Future[BatchResult | None]


class Combiner:
    """Stores batches through ``write``, those queued while a write is in flight together,
    up to ``max_events`` events a transaction."""

    def __init__(self, write: Write, max_events: int, *, gather_s: float = 0.0) -> None:
        self._write = write
        self.max_events = max_events
        self.gather_s = gather_s
        # how many partitions may send a batch (the consumer sets it: the ones it reads)
        self.expect: Callable[[], int] = lambda: 1
        self._queue: deque[_Ask] = deque()
        self._arrived = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A transaction is being gathered or written: a batch stored now waits in the queue
        for it to end, and goes in the next one with whatever else came meanwhile."""
        return self._flusher is not None and not self._flusher.done()

    def joinable(self, envelopes: list[Envelope]) -> bool:
        """Small enough to be worth a shared transaction."""
        return 0 < len(envelopes) < max(2, self.max_events // 2)

    async def store(self, envelopes: list[Envelope]) -> BatchResult | None:
        """The stored batch's result (empty, with ``joined`` set, where it rode with an
        earlier batch); None when the shared write failed: nothing of it committed, and the
        caller stores the batch alone."""
        ask = _Ask(envelopes, asyncio.get_running_loop().create_future())
        self._queue.append(ask)
        self._arrived.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run(), name="combined-batches")
        # a cancelled caller cancels its future: a write not yet begun leaves its batch out,
        # one in flight goes on (its entries are not acked, so they come again and insert nothing)
        return await ask.done

    async def _gather(self) -> None:
        """From idle: until a batch has come from each partition, or half a transaction's
        events, or ``gather_s`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_s
        while len(self._queue) < self.expect() and sum(len(a.envelopes) for a in self._queue) < self.max_events // 2:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
                return

    async def _run(self) -> None:
        if self.gather_s > 0:
            await self._gather()
        while self._queue:
            take: list[_Ask] = []
            n = 0
            while self._queue and (not take or n + len(self._queue[0].envelopes) <= self.max_events):
                ask = self._queue.popleft()
                if not ask.done.done():
                    take.append(ask)
                    n += len(ask.envelopes)
            if not take:
                continue
            try:
                result: BatchResult | None = await self._write([e for a in take for e in a.envelopes])
            except Exception:
                result = None  # each stores alone; their errors are their own there
            except BaseException:  # the flusher itself cancelled: no caller may wait for ever
                for a in take:
                    a.done.cancel()
                raise
            if result is not None and (shared := _shared(take)):
                # an event read from two partitions (a copy appended under another partition
                # count) is stored once here, and no batch alone sees it twice: a copy to every
                # batch that holds it, so each files its entry (``erased.filed``); an
                # erasure's sweep stops at the first entry of an event it finds by its time
                # that was not filed
                result.copies = result.copies | shared
            for a in take:
                if not a.done.done():  # its caller gone: the counts go to the next one
                    a.done.set_result(result)
                    if result is not None:  # which events had no row, or one already: every batch's to know
                        result = BatchResult(
                            joined=True, rowless=result.rowless, copies=result.copies, owners=result.owners
                        )


def _shared(take: list[_Ask]) -> set[UUID]:
    """The events of more than one of ``take``'s batches."""
    seen: set[UUID] = set()
    shared: set[UUID] = set()
    for a in take:
        ids = {e.event_id for e in a.envelopes}
        shared |= ids & seen
        seen |= ids
    return shared
