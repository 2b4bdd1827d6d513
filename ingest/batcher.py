"""Micro-batching: the Redis commands of concurrent requests share one round trip.

Each request hands its commands to ``RedisBatcher.execute`` and awaits its own results.
One flusher task sends everything queued so far as one non-transactional pipeline; while
that round trip is in flight the next requests queue up, so batches grow with load and
an idle edge adds no delay. A pipeline is not a transaction: commands may touch keys in
different cluster slots (the cluster client splits the pipeline by node).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .connections import Redis
from .redislink import Link, link_for

Command = tuple[Any, ...]


class RedisBatcher:
    def __init__(
        self, redis: Redis, *, max_commands: int = 2048, observe: Callable[[int, float], None] | None = None
    ) -> None:
        self._link: Link = link_for(redis)
        self._max = max_commands
        self._observe = observe  # (commands, seconds) of each round trip
        self._queue: deque[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._scripts: dict[str, str] = {}

    def script(self, source: str) -> str:
        """Register a Lua script; returns the sha to use in ``("EVALSHA", sha, ...)``."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        return sha

    async def execute(self, *commands: Command) -> list[Any]:
        """Run ``commands`` in the next round trip; a failed command's slot holds its error."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="redis-batcher")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((commands, fut))
        self._wake.set()
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._link.close()
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(ConnectionError("edge shutting down"))
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
                n = 0
                while self._queue and (not batch or n + len(self._queue[0][0]) <= self._max):
                    item = self._queue.popleft()
                    batch.append(item)
                    n += len(item[0])
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        # nothing may escape: the flusher must outlive any failure, and every caller of
        # this batch must hear the outcome (connection lost, timeout, a failed reload)
        start = time.perf_counter()
        try:
            results = await self._send(batch)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if self._observe is not None:
            self._observe(sum(len(c) for c, _ in batch), time.perf_counter() - start)
        i = 0
        for commands, fut in batch:
            if not fut.done():
                fut.set_result(results[i : i + len(commands)])
            i += len(commands)

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> list[Any]:
        results = await self._link.send([cmd for commands, _ in batch for cmd in commands])
        if any(_is_noscript(r) for r in results):
            results = await self._retry_noscript(batch, results)
        return results

    async def _retry_noscript(
        self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]], results: list[Any]
    ) -> list[Any]:
        # Redis restarted or flushed its script cache: load once, re-run what failed.
        await self._link.load_scripts(list(self._scripts.values()))
        flat = [cmd for commands, _ in batch for cmd in commands]
        retry = [i for i, r in enumerate(results) if _is_noscript(r)]
        again = await self._link.send([flat[i] for i in retry])
        results = list(results)
        for i, r in zip(retry, again, strict=True):
            results[i] = r
        return results


def _is_noscript(r: object) -> bool:
    return isinstance(r, NoScriptError) or (isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"))
