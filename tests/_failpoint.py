"""``refstream`` with a failpoint: a process that SIGKILLs itself at a chosen step, for the
tests that prove what a crash there leaves behind. The product holds no test cases: this
wrapper wraps the step's method, then runs the CLI as the ``refstream`` script does.

    python -m tests._failpoint NAME refstream-args...

- ``crash_after_commit``: a worker, once its batch is committed and before the XACK;
- ``crash_on:CODE``: a worker, before the commit of a batch holding an event for link
  CODE (a poison entry that kills every worker that reads it);
- ``archive_crash_after_put``: an archiver, once a segment is uploaded and before the XACK;
- ``archive_stop_before_put``: an archiver SIGSTOPs itself as its first upload begins (its
  claims idle out; a SIGCONT lets it go on);
- ``move_crash_after:STEP``: ``refstream workspace move``, once its mover's STEP (``copy``:
  the first copy, ``fence``, ``finish``: the last catch up) is done; ``switch``: once the
  switch is recorded, before the command answers.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from refstream.cli import main
from workers.archive.store import LocalStore, ObjectStore
from workers.consumer.pipeline import Pipeline
from workers.ops.move import Mover


def _die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _stop_once() -> Callable[..., bool]:
    stopped = False

    def stop(*_: Any, **__: Any) -> bool:
        nonlocal stopped
        if not stopped:
            stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, as a pause would
        return False

    return stop


def _wrap(cls: type, name: str, *, before: Callable[..., bool] | None = None, after: bool = False) -> None:
    original = getattr(cls, name)  # an AttributeError, not a silent no-op, when it is renamed

    @functools.wraps(original)
    async def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if before is not None and before(*args, **kwargs):
            _die()
        result = await original(self, *args, **kwargs)
        if after:
            _die()
        return result

    setattr(cls, name, step)


def _wrap_function(module: Any, name: str, *, after: Callable[..., bool]) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    async def step(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if after(*args, **kwargs):
            _die()
        return result

    setattr(module, name, step)


def install(name: str) -> None:
    if name == "crash_after_commit":
        _wrap(Pipeline, "_store_chunked", after=True)
    elif name.startswith("crash_on:"):
        code = name.removeprefix("crash_on:")
        _wrap(
            Pipeline,
            "_store_chunked",
            before=lambda envelopes, *_, **__: any(e.payload.get("code") == code for e in envelopes),
        )
    elif name == "archive_crash_after_put":
        for store in (LocalStore, ObjectStore):
            _wrap(store, "put", after=True)
    elif name == "archive_stop_before_put":
        stop = _stop_once()
        for store in (LocalStore, ObjectStore):
            _wrap(store, "put", before=stop)
    elif name == "move_crash_after:switch":
        from refstream.commands import move

        _wrap_function(move, "_record", after=lambda *_, **changes: changes.get("state") == "switched")
    elif name.startswith("move_crash_after:"):
        _wrap(Mover, name.removeprefix("move_crash_after:"), after=True)
    else:
        raise SystemExit(f"unknown failpoint {name!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    main(args=sys.argv[2:], prog_name="refstream")
