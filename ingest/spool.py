"""The edge's local spool: where accepted events wait while Redis is unreachable.

Records are lines ``<stream key>\\t<envelope JSON>\\n`` appended to segment files
``<dir>/<unix ms>-<pid>-<n>.spool``. Appends from concurrent requests are written and
fsynced together (a request's 2xx waits for its own fsync, so an accepted event is on disk
before it is acknowledged). A process holds an exclusive ``flock`` on the segment it writes,
so several edges can share a directory. A drain loop, once Redis answers again, closes the
current segment and replays every unlocked segment, oldest first, with pipelined XADDs,
then deletes it. A crash mid-drain replays a segment twice: the duplicates carry the same
event ids, and the workers' idempotency absorbs them. Segments left by a process that died
are drained by the next one. The whole spool is capped at ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import IO

import structlog

from .connections import REDIS_ERRORS, Redis
from .events import FIELD

log = structlog.get_logger("ingest.spool")

SUFFIX = ".spool"
DRAIN_BATCH = 500


class SpoolFull(Exception):
    pass


class Spool:
    def __init__(self, directory: str | Path, *, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._n = 0
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # segment rotation vs. writes
        self.spooled = 0
        self.drained = 0

    # -- writing -----------------------------------------------------------------------

    async def append(self, stream: str, envelope: bytes) -> None:
        """Durably record one event; returns once it is fsynced."""
        if self.size() >= self.max_bytes:
            raise SpoolFull(f"spool at {self.max_bytes} bytes")
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((stream.encode() + b"\t" + envelope + b"\n", fut))
        self._wake.set()
        await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with self._lock:
                        f = self._segment()
                        data = b"".join(line for line, _ in batch)
                        # the write and the fsync block: off the event loop, one batch at a time
                        await asyncio.to_thread(_write_sync, f, data)
                except OSError as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.spooled += len(batch)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    def _segment(self) -> IO[bytes]:
        if self._file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._n += 1
            self._path = self.dir / f"{int(time.time() * 1000):013d}-{os.getpid()}-{self._n}{SUFFIX}"
            self._file = open(self._path, "ab")
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self._file

    async def _rotate(self) -> None:
        async with self._lock:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
                self._file = self._path = None

    # -- reading -----------------------------------------------------------------------

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob(f"*{SUFFIX}")) if self.dir.is_dir() else []

    def size(self) -> int:
        total = 0
        for p in self.segments():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                continue  # drained meanwhile
        return total

    async def drain(self, redis: Redis) -> int:
        """Replay every segment nobody is writing, oldest first. Returns entries replayed."""
        if not self.segments():
            return 0
        await self._rotate()
        replayed = 0
        for path in self.segments():
            claimed = await asyncio.to_thread(_claim, path)
            if claimed is None:
                continue
            f, data = claimed
            try:
                replayed += await self._replay(redis, data)
                path.unlink()  # only once every line is in Redis
            finally:
                f.close()
        if replayed:
            self.drained += replayed
            log.info("spool.drained", entries=replayed)
        return replayed

    async def _replay(self, redis: Redis, data: bytes) -> int:
        n = 0
        lines = [line for line in data.split(b"\n") if line]
        for start in range(0, len(lines), DRAIN_BATCH):
            pipe = redis.pipeline(transaction=False)
            for line in lines[start : start + DRAIN_BATCH]:
                stream, sep, envelope = line.partition(b"\t")
                if not sep:
                    continue  # a torn last line from a crash mid-write: never acknowledged
                pipe.xadd(stream.decode(), {FIELD: envelope})
                n += 1
            await pipe.execute()
        return n

    async def _drain_loop(self, redis: Redis, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.drain(redis)
            except REDIS_ERRORS:
                pass  # still down: next time
            except Exception:
                log.exception("spool.drain_failed")

    def start(self, redis: Redis, *, every_s: float = 1.0) -> None:
        self._drainer = asyncio.create_task(self._drain_loop(redis, every_s), name="spool-drainer")

    async def close(self) -> None:
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(OSError("edge shutting down"))
        self._pending.clear()
        for task in (self._drainer, self._writer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._rotate()


def _claim(path: Path) -> tuple[IO[bytes], bytes] | None:
    """Open, lock and read a segment nobody else holds; None if it is taken or gone."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None  # another process writes or drains it
    if not path.exists():
        f.close()
        return None  # drained by another process between our listing and our lock
    return f, f.read()


def _write_sync(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
