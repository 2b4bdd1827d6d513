"""A stop with a bound: tasks asked to end are waited for so long, never for ever, and the
ones that did not end are named with where they wait.

Why a cancel is not enough on its own: on Python 3.11, ``asyncio.wait_for`` returns the
inner result when its task is cancelled in the loop iteration after the inner work finished,
and the cancel is lost. redis-py 5 sends every command through such a ``wait_for`` (its
socket timeout), so a task cancelled in the middle of a Redis call sometimes goes on as if
nothing had been asked, with ``Task.cancelling()`` still counting the lost request. A loop
that only a cancel ends then never ends, and whoever awaits it neither (a worker that
never exited on SIGTERM: ``Member._housekeeping`` went on after ``consumer.stop`` should
have been logged). Such loops call ``ingest.contract.connections.cancelled_meanwhile()`` on
every turn, and what awaits them does it through ``end`` below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger("workers.group")

CANCEL_GRACE_S = 2.0  # a cancelled task's own cleanup (a Redis call, a release) before it is given up


async def settle(tasks: Iterable[asyncio.Task[object]], within_s: float) -> set[asyncio.Task[object]]:
    """Wait up to ``within_s`` for ``tasks`` to end; those still running come back (their
    outcomes are read, never raised here)."""
    pending = {t for t in tasks if not t.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, within_s))
    for task in pending:
        task.add_done_callback(_read_outcome)
    return pending


async def end(tasks: Iterable[asyncio.Task[object]], what: str, *, within_s: float = CANCEL_GRACE_S) -> bool:
    """Cancel ``tasks`` and wait up to ``within_s`` for them; False (and one line naming
    each and where it waits) when some did not end: they are left behind, not waited for."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    stuck = await settle(tasks, within_s)
    if stuck:
        log.error("stop.tasks_stuck", what=what, within_s=within_s, tasks=[waiting_at(t) for t in stuck])
    return not stuck


def waiting_at(task: asyncio.Task[object]) -> str:
    """``task``'s name and its chain of awaits, outermost first: where it waits."""
    chain: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(chain) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None)
    return f"{task.get_name()} cancelling={task.cancelling()}: {' -> '.join(chain)}"


def _read_outcome(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # read: no "exception was never retrieved" for a task given up
