"""``refstream serve --take-over``: a new supervisor, of a new version, takes the running
one's listening sockets (``ingest.host.prefork``).

Every supervisor listens on a control socket named by its port (``control_path``, made by
``listen``); the new one connects (``take_over``), is sent the listening sockets
(SCM_RIGHTS, by ``hand_over``), starts its children on them, and once each slot has a
ready child says so: the old one (``successor_said``) then drains as on SIGTERM and exits,
and the new one, seeing its end close (``predecessor_gone``), takes the control socket's
name. The sockets never close, so no connection waiting in their queues is reset: the
rolling restart of the supervisor itself, without a balancer.

This module is the exchange on the control socket; when each step happens is the
supervisor's loop.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog

from ingest.contract.errors import Refused

log = structlog.get_logger("ingest.takeover")


def control_path(host: str, port: int) -> Path:
    """Where the supervisor serving ``host:port`` listens for a successor (``--take-over``)."""
    where = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(where) / f"refstream-serve-{''.join(c if c.isalnum() else '_' for c in host)}-{port}.sock"


class NothingToTakeOver(Refused):
    """No supervisor answers on the control socket of that host and port."""


def take_over(path: Path, timeout_s: float = 10.0) -> tuple[socket.socket, list[list[socket.socket]]]:
    """Ask the supervisor listening on ``path`` for its sockets: (the control connection,
    kept open until that supervisor has exited, and the listening sockets of each slot)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        conn.connect(str(path))
        conn.sendall(b"take-over\n")
        data, fds, _, _ = socket.recv_fds(conn, 4096, 256)
    except OSError as exc:
        conn.close()
        raise NothingToTakeOver(f"no refstream serve answers on {path}: {exc}") from exc
    counts = [int(n) for n in data.decode().split(",") if n]
    if not counts or sum(counts) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise NothingToTakeOver(f"the supervisor on {path} sent {len(fds)} sockets for slots {counts}")
    socks = [socket.socket(fileno=fd) for fd in fds]
    for s in socks:
        s.set_inheritable(True)
    slots, i = [], 0
    for n in counts:
        slots.append(socks[i : i + n])
        i += n
    conn.settimeout(None)
    return conn, slots


def say_ready(predecessor: socket.socket) -> None:
    """Tell the supervisor whose sockets these are that every slot serves: it may drain."""
    try:
        predecessor.sendall(b"ready\n")
    except OSError:
        pass  # it is gone already: nothing is left to tell


def listen(path: Path) -> socket.socket | None:
    """The control socket a successor connects to, non-blocking, at ``path``; None where
    another supervisor serves this port (it answers there) or the name cannot be bound
    (serving goes on, without a take-over). A name left by a killed supervisor is reused."""
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            alive = True
        except OSError:
            alive = False  # left by a supervisor that was killed
        finally:
            probe.close()
        if alive:
            log.warning("prefork.control_taken", path=str(path), why="another supervisor serves this port")
            return None
        path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)  # its owner alone may take the sockets
        listener.listen(4)
    except OSError as exc:
        listener.close()
        log.warning("prefork.control_unavailable", path=str(path), error=exc)
        return None
    listener.setblocking(False)
    return listener


def hand_over(
    control: socket.socket, slots: Sequence[Sequence[socket.socket]], *, refuse: bool
) -> socket.socket | None:
    """A new supervisor asks on ``control`` for the sockets: they are sent, each slot's
    count first, and its connection is returned (non-blocking) to say when it serves. None:
    no one was waiting, it asked something else, ``refuse`` (this one stops, or another
    successor is taking over), or the sending failed."""
    try:
        conn, _ = control.accept()
    except BlockingIOError:
        return None
    conn.settimeout(5.0)
    try:
        if conn.recv(64).strip() != b"take-over" or refuse:
            conn.close()
            return None
        socks = [s for slot in slots for s in slot]
        counts = ",".join(str(len(slot)) for slot in slots).encode()
        socket.send_fds(conn, [counts], [s.fileno() for s in socks])
    except OSError as exc:
        log.warning("prefork.take_over_failed", error=exc)
        conn.close()
        return None
    conn.setblocking(False)
    return conn


def successor_said(successor: socket.socket) -> bool | None:
    """What the successor said: True, it serves (this one drains); False, it went away
    before it served (this one serves on); None, nothing yet."""
    try:
        said = successor.recv(64)
    except BlockingIOError:
        return None
    except OSError:
        said = b""
    return said.startswith(b"ready")


def predecessor_gone(predecessor: socket.socket) -> bool:
    """The old supervisor has exited (its end of the connection closed)."""
    try:
        if predecessor.recv(64):
            return False
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True
