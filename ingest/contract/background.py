"""A process's background loops, stopped: cancelled, waited for a bounded while, and their
end read, never raised. A loop cancelled inside a driver's call may end with whatever the
driver raises then (asyncpg's ``InterfaceError`` from a transaction's exit on a connection
the cancel closed), and a process's shutdown is no place for it: its exit code would say
the process failed (the generative test's ``crash``, seed 105281496)."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("background")

WITHIN_S = 2.0  # a stopping loop's call in flight ends within this, or the loop is left behind


async def stopped(task: asyncio.Task[None] | None, what: str, within_s: float = WITHIN_S) -> None:
    """Cancel ``task`` and wait for it, ``within_s`` at most; its outcome is read, never
    raised (a loop left running is one line, naming it)."""
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        log.error("background.stuck", what=what, within_s=within_s)
    elif not task.cancelled():
        task.exception()  # read: the loop's end is not the closer's error
