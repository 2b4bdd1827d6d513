"""A member's housekeeping (``workers.group.member``): reclaim, the user's chores and the
member's state for ``refstream status``, each on its own timer (``run``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ingest.contract.connections import Redis, cancelled_meanwhile
from ingest.contract.keys import Keys
from workers.group import presence
from workers.group.gate import Gate
from workers.group.part import Chore

log = structlog.get_logger("workers.group")


async def run(
    redis: Redis,
    keys: Keys,
    presence_name: str,
    chores: list[Chore],
    gate: Gate,
    publish_now: asyncio.Event,
    state: Callable[[], dict[str, Any]],
    stopping: Callable[[], bool],
) -> None:
    """Reclaim, the user's chores and the state on their own timers, each failure logged
    and survived; the state also at once on a change. Reclaiming waits while Postgres is
    out (nothing could be processed) and once stopping (it would take back what was just
    handed back)."""
    due = [0.0] * len(chores)
    next_state = 0.0
    while True:
        for i, chore in enumerate(chores):
            # the stop's cancel, lost in a Redis call, would leave this loop running for
            # ever and the stop waiting on it (workers/group/stopping.py)
            cancelled_meanwhile()
            now = time.monotonic()
            if now < due[i]:
                continue
            if (chore.needs_postgres and gate.closed) or (chore.name == "reclaim" and stopping()):
                due[i] = now + min(1.0, chore.every_s)
                continue
            due[i] = now + chore.every_s
            await _safely(chore.name, chore.step())
        now = time.monotonic()
        if now >= next_state or publish_now.is_set():
            publish_now.clear()
            next_state = now + presence.EVERY_S
            await _safely("state", presence.publish(redis, keys, presence_name, state()))
            cancelled_meanwhile()
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (see layout.Watch)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.05, min([*due, next_state]) - time.monotonic())):
                await publish_now.wait()


async def _safely(what: str, step: Awaitable[Any]) -> None:
    try:
        await step
    except Exception as exc:
        log.warning("housekeeping.failed", task=what, error=exc)
