"""What the spool scenarios share: a Redis that survives its own SIGKILL (append-only file,
fsynced at every write: an outage, not a loss, so what the edge put in Redis before it is
still there after), the edge processes of a stage, and the spool's content."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from typing import cast

from ingest.spool import store as spool_store

from ._servers import FaultRedis
from ._stage import Stage

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


async def durable_redis(private_fault_redis: Callable[..., Awaitable[FaultRedis]]) -> FaultRedis:
    return await private_fault_redis(*DURABLE)


def redis_down(server: FaultRedis) -> None:
    server.kill()  # SIGKILL: the edge's connections fail at once


async def redis_up(server: FaultRedis) -> None:
    server.start()
    await server.ready()


def edges(stage: Stage) -> list[subprocess.Popen[bytes]]:
    # Procs.start's processes: each started from a list, ``refstream`` and its arguments
    return [p for p in stage.procs.running if cast(list[str], p.args)[1] == "serve" and p.poll() is None]


async def kill_edge(stage: Stage, proc: subprocess.Popen[bytes]) -> None:
    stage.killed.add(proc.pid)
    proc.kill()
    await asyncio.to_thread(proc.wait, 30)


def spooled(stage: Stage) -> int:
    return spool_store.usage(stage.check.spool_dir).entries


def merge(*records: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records:
        out.update(r)
    return out
