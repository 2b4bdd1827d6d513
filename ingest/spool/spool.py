"""The edge's local spool: where accepted events wait while Redis is unreachable, or while
it is not known whether Redis took them (``ingest.edge.enqueue``: a timeout, a durability level
not confirmed; the copy in Redis, if any, has the same event id). Its drain, which sends
them on once Redis answers: ``ingest.spool.drain``.

The store is one SQLite database in WAL mode (``ingest.spool.store``), in ``<dir>``.
Appends from concurrent requests are committed together, one transaction per batch, off
the event loop (group commit); a request's 2xx waits for the commit, fsynced, of its own
event. A failed transaction (disk full, file too large) rolls back: every request of that
batch is refused (503) and nothing of it is drained later. The size is the totals row kept
in the same transactions: O(1), never a scan. An event's extra commands (the click cache
entry) are stored with it and replayed with its XADD. A keyed event keeps its idempotency
check (``spool_store.Once``) and is replayed through the edge's own script
(``ingest.link.once.APPEND_ONCE``). While it is spooled, the key's record lives in the
spool too, for the key's window: a second copy spooled by any process sharing the directory
is not kept. (A spooled keyed copy is answered "may be stored", never with its own answer:
``ingest.edge.keyed``.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from ingest.contract.errors import Outage
from ingest.link.durability import Durability
from ingest.spool import store as store
from ingest.spool.drain import Drain

log = structlog.get_logger("ingest.spool")

# close(): how long the writer may take to commit what is queued, a drain step to finish,
# and either one to end once cancelled
WRITER_CLOSE_S = 30.0
DRAINER_CLOSE_S = 10.0
CANCELLED_END_S = 5.0


class SpoolError(Outage, OSError):
    """The spool could not keep an event: the caller must not answer 2xx (routes answer 503)."""


class SpoolFull(SpoolError):
    """The spool is at its cap (``REFSTREAM_SPOOL_MAX_BYTES``)."""


class Spool(Drain):
    def __init__(self, directory: str | Path, *, max_bytes: int, durability: Durability | None = None) -> None:
        super().__init__(durability)
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._pending: list[tuple[str, bytes, bytes | None, store.Once | None, asyncio.Future[bytes | None]]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._wconn: sqlite3.Connection | None = None  # the writer's (its task only)
        self._entries = 0  # as of this process's last transaction or look
        self._bytes = 0
        self.spooled = 0

    # -- what it holds: O(1) -------------------------------------------------------------

    def size(self) -> int:
        """Bytes of pending rows, as of the last transaction or drain tick."""
        return self._bytes

    def entries(self) -> int:
        return self._entries

    def failing(self) -> dict[str, str]:
        """The operations failing now, with their error."""
        return dict(self._failing)

    # -- writing -------------------------------------------------------------------------

    async def append(
        self, stream: str, envelope: bytes, extra: Iterable[tuple[Any, ...]] = (), once: store.Once | None = None
    ) -> bytes | None:
        """Durably record one event (and the commands to replay with it, and a keyed event's
        check); returns once it is committed: None, or for a keyed event whose key a copy
        spooled first (by any process sharing the spool), that copy's answer, and this one
        is not kept. Raises ``SpoolFull`` at the cap, ``SpoolError`` when the disk refuses."""
        if self._stop.is_set():
            raise SpoolError("edge shutting down")
        if self._bytes >= self.max_bytes:
            raise SpoolFull(f"spool at {self.max_bytes} bytes")
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._pending.append((stream, envelope, store.encode_extra(extra, once), once, fut))
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
            if self._stop.is_set():
                return

    async def _flush(
        self, batch: list[tuple[str, bytes, bytes | None, store.Once | None, asyncio.Future[bytes | None]]]
    ) -> None:
        try:
            kept, (self._entries, self._bytes) = await asyncio.to_thread(
                self._insert_sync, [(s, e, x, o) for s, e, x, o, _ in batch]
            )
        except (sqlite3.Error, OSError) as exc:
            self._failed("append", exc)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(SpoolError(f"spool write failed: {store.describe(exc)}"))
            return
        self._recovered("append")
        for ok, (*_, fut) in zip(kept, batch, strict=True):
            if fut.done():
                continue  # the request went away; its event is kept all the same
            if isinstance(ok, bytes):
                fut.set_result(ok)  # a copy of its key was spooled first
            elif ok:
                fut.set_result(None)
            else:
                fut.set_exception(SpoolFull(f"spool at {self.max_bytes} bytes"))
        self.spooled += sum(1 for ok in kept if ok is True)

    def _insert_sync(
        self, rows: list[tuple[str, bytes, bytes | None, store.Once | None]]
    ) -> tuple[list[bool | bytes], tuple[int, int]]:
        try:
            if self._wconn is None:
                self._wconn = store.connect(self.dir)
                store.take_reserve(self.dir)
            out = store.insert(self._wconn, rows, self.max_bytes, clear_error=self._error_recorded)
            self._error_recorded = False
            return out
        except (sqlite3.Error, OSError) as exc:
            self._note_error(self._wconn, "append", exc)
            raise

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, let a drain step finish (a bounded wait), close the store."""
        self._stop.set()
        self._wake.set()
        for task, wait_s in ((self._writer, WRITER_CLOSE_S), (self._drainer, DRAINER_CLOSE_S)):
            if task is None:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(task), wait_s)
            except TimeoutError:
                # cut short, then let it end before what it holds is closed under it: a drain
                # step gives its lock back in its own ``finally``
                task.cancel()
                await asyncio.wait({task}, timeout=CANCELLED_END_S)
            except Exception:
                log.exception("spool.close_failed")
        for *_, fut in self._pending:
            if not fut.done():
                fut.set_exception(SpoolError("edge shutting down"))
        self._pending.clear()
        if self._wconn is not None:
            self._wconn.close()
        self._wconn = None
        await self._close_drain()
