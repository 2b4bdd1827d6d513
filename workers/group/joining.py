"""A member in its group (``workers.group.member``): the group on a partition made, or
waited for through outages (``ensure``, ``join``), and left at a clean stop (``leave``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import structlog
from redis.exceptions import ResponseError

from ingest.contract import layout
from ingest.contract.connections import Redis, cancelled_meanwhile
from ingest.contract.keys import Keys
from workers.group import presence
from workers.group.claims import text
from workers.group.errors import redis_outage
from workers.group.gate import Backoff, Gate

log = structlog.get_logger("workers.group")

LEAVE_WITHIN_S = 5.0  # a stop's hand-back, and its goodbye (state forgotten, empty member deleted): best effort


async def ensure(redis: Redis, keys: Keys, group: str, stream: str) -> None:
    """Create the group on ``stream`` from id 0. A full or read-only Redis refuses the
    creation even when the group exists: then it is enough that it exists. ``Retired``
    when the partition was retired: its stream is never made again."""
    p = Keys.partition_of(stream)
    try:
        if p is None:
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        else:
            await layout.ensure(redis, keys, p, (group,))
    except layout.Retired:
        raise
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return
        if redis_outage(exc) in ("redis_oom", "redis_readonly") and await _group_exists(redis, group, stream):
            return
        raise


async def _group_exists(redis: Redis, group: str, stream: str) -> bool:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return False  # no such key
    return any(text(g["name"]) == group for g in groups)


async def join(
    redis: Redis, keys: Keys, group: str, gate: Gate, p: int, stream: str, stopping: Callable[[], bool]
) -> bool:
    """The group on partition ``p``, waited for through outages (the partition shown as
    blocked meanwhile); False when stopped first."""
    backoff, waiting = Backoff(first=0.5, cap=5.0), None
    while True:
        try:
            await ensure(redis, keys, group, stream)
        except layout.Retired:
            return False
        except Exception as exc:
            if (reason := redis_outage(exc)) is None:
                raise
            cancelled_meanwhile()
            if reason != waiting:  # one line per state, not per retry
                log.warning("group.waiting", group=group, stream=stream, reason=reason, error=exc)
                waiting = reason
                gate.block(p, reason)
            if stopping():
                gate.clear(p)
                return False
            await backoff.sleep()
            continue
        if waiting is not None:
            log.info("group.ready", group=group, stream=stream)
            gate.clear(p)
        return True


async def leave(
    redis: Redis, keys: Keys, group: str, name: str, presence_name: str, role: str, joined: Iterable[int]
) -> None:
    """A clean stop: remove this member's state, and it from the group where it holds
    nothing (names are per process: they would pile up)."""
    try:
        async with asyncio.timeout(LEAVE_WITHIN_S):
            await _forget(redis, keys, group, name, presence_name, joined)
    except Exception as exc:
        log.warning(f"{role}.leave_failed", error=exc)


async def _forget(redis: Redis, keys: Keys, group: str, name: str, presence_name: str, joined: Iterable[int]) -> None:
    await presence.forget(redis, keys, presence_name)
    for p in joined:
        stream = keys.stream(p)
        consumers = await redis.xinfo_consumers(stream, group)
        mine = next((c for c in consumers if text(c["name"]) == name), None)
        if mine is not None and int(mine["pending"]) == 0:
            await redis.xgroup_delconsumer(stream, group, name)
