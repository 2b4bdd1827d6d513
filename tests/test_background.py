"""A process's background loops end quietly at shutdown (``ingest.contract.background``):
a loop cancelled inside a driver's call may end with what the driver raises then, not the
``CancelledError`` (asyncpg's ``InterfaceError`` from a transaction's exit on a connection
the cancel closed: the generative test's ``crash``, seed 105281496, an edge whose
suppression loop was cancelled mid-read exited 1 at shutdown). Each closer reads its
loop's end and never raises it; and no closer in the tree waits for a cancelled loop any
other way."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.contract.drops import DropTally
from ingest.contract.keys import Keys
from ingest.contract.layout import Watch
from ingest.edge.batcher import RedisBatcher
from ingest.privacy.suppressed import Suppressed

ROOT = Path(__file__).resolve().parents[1]


async def _ends_in_a_driver_error() -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the connection is closed") from None


class _Nothing:
    async def execute(self, *commands: Any, **kwargs: Any) -> list[Any]:
        return []


@pytest.mark.parametrize("owner", ["suppressions", "drop tally", "layout watch", "redis batcher"])
async def test_a_loop_that_ends_in_a_driver_error_as_it_is_cancelled_closes_quietly(
    owner: str, redis: Any, keys: Keys
) -> None:
    made: Any = {
        "suppressions": lambda: Suppressed(),
        "drop tally": lambda: DropTally(_Nothing(), keys.prefix),
        "layout watch": lambda: Watch(redis, keys, keys.partitions),
        "redis batcher": lambda: RedisBatcher(redis),
    }[owner]()
    made._task = asyncio.create_task(_ends_in_a_driver_error())
    await asyncio.sleep(0)  # the loop waits, as a loop inside a driver's call does
    await made.close()  # the old closers raised the InterfaceError
    assert made._task is None


def test_no_closer_awaits_a_cancelled_loop_but_through_background_stopped() -> None:
    """A ``.cancel()`` of a ``self._task`` followed by an ``await`` of it: the shape of the
    closers that raised what the loop ended with."""
    found = []
    for path in [*(ROOT / "ingest").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(f := node.func, ast.Attribute) and f.attr == "cancel":
                target = ast.unparse(f.value)
                if target.startswith("self._task"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}.cancel()")
    assert found == []
