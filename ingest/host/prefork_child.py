"""One process of ``refstream serve --processes N``, as its supervisor starts it: ``python -m
ingest.host.prefork --child`` (``ingest.host.prefork``, whose doc says how children are
supervised). It reads its settings, configures its logging, and serves its slot's sockets
(``ingest.host.server.serve_child``); it drains on SIGTERM, which it gets when the
supervisor dies too (PDEATHSIG), and ignores SIGHUP (a reload is the supervisor's)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the supervisor dies; at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    """A child's entry: its settings and logging, then ``ingest.host.server.serve_child``."""
    parser = argparse.ArgumentParser(prog="python -m ingest.host.prefork --child")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--ready", type=int, required=True)
    parser.add_argument("--rundir", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's
    _die_with_parent(args.parent)

    import uvloop
    from pydantic import ValidationError

    from ingest.contract import clock
    from ingest.contract.logs import configure_logging
    from ingest.contract.settings import Settings, explain
    from ingest.host.server import serve_child

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"Error: {explain(exc)}", file=sys.stderr)
        return 2
    clock.configure(settings.clock_offset_s)
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms)
    socks = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",")]
    uvloop.run(serve_child(settings, socks, args.ready, args.rundir))
    return 0
