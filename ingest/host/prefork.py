"""``refstream serve --processes N``: N edge processes on one port, and their supervisor.

**Sockets.** The supervisor binds one listening socket per *slot* (N slots), each with
``SO_REUSEPORT``, so the kernel spreads new connections over the slots; a child process
serves its slot's socket. A slot's socket belongs to the supervisor, not to the child: the
connections waiting in its accept queue when its child dies or drains are accepted by the
slot's next child instead of being reset (a socket closed in a reuseport group resets its
queue). A slot whose children keep dying at start closes its socket, so its share of new
connections goes to the other slots until a child of it is up again.

**Children** are fresh interpreters (``python -m ingest.host.prefork --child``, whose entry
is ``ingest.host.prefork_child``), not forks: a reload starts the code and settings
installed now, and nothing of the supervisor's state (threads, event loop) is inherited.
Each builds its settings and app, accepts, and writes one byte on a pipe when ready. A
child gets SIGTERM when the supervisor dies (PDEATHSIG).

**Supervision.** A child that dies is replaced at once; one that dies before it was ready,
or within ``STABLE_S`` of it, makes the next start of its slot wait, doubling from
``FIRST_BACKOFF_S`` to ``MAX_BACKOFF_S``, so a child that crashes at start cannot spin. At
the very first start a child dying before ready stops the server with an error instead: a
configuration the children refuse is not fixed by restarting them.

**SIGHUP** reloads: a new child per slot (same socket); as each is ready, the slot's old
child gets SIGTERM and drains. No request fails: old and new share the slot's queue.

**Taking over** (``refstream serve --take-over``): a new supervisor, of a new version, takes
the running one's sockets over a control socket, and the old one drains once the new one
serves (``ingest.host.takeover``). The sockets never close, so no connection waiting in
their queues is reset.

**SIGTERM / SIGINT** drain: every child stops accepting, finishes its requests in flight,
flushes its micro-batcher, spool and drops tally, and exits; the supervisor exits once all
have. Connections still queued then (none, behind a load balancer that stopped sending)
are reset with the sockets.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ingest.host import takeover

log = structlog.get_logger("ingest.prefork")

FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 15.0
STABLE_S = 2.0  # a child up this long after ready was not crashing at start
BACKLOG = 1024


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: a cpuset-limited container's own)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, in a ``SO_REUSEPORT`` group."""
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            s = socket.socket(family, kind, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(address)
            s.listen(BACKLOG)
            s.set_inheritable(True)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@dataclass(eq=False)
class Child:
    slot: Slot
    proc: subprocess.Popen[bytes]
    ready_r: int
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    retiring: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(eq=False)
class Slot:
    index: int
    socks: list[socket.socket]
    streak: int = 0  # quick deaths in a row
    restart_at: float | None = None
    children: list[Child] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        host: str,
        port: int,
        processes: int,
        print: Callable[[str], None],
        child: Sequence[str] = (),
        take_over: bool = False,
    ) -> None:
        """``child``: the command of a child (default: this interpreter's ``-m ingest.host.prefork
        --child``), given ``--fds``, ``--ready``, ``--rundir`` and ``--parent``. ``take_over``:
        the sockets of the supervisor running on ``host:port``, rather than sockets of its own
        (the module's doc); raises ``takeover.NothingToTakeOver`` from ``run`` where none runs."""
        self.host, self.port, self.processes = host, port, processes
        self.take_over = take_over
        self.control: socket.socket | None = None  # the listener a successor connects to
        self.control_at: Path | None = None
        self.predecessor: socket.socket | None = None  # taking over: open until it has exited
        self.successor: socket.socket | None = None  # taken over: the new supervisor's connection
        self.print = print
        self.child = list(child) or [sys.executable, "-m", "ingest.host.prefork", "--child"]
        self.slots: list[Slot] = []
        self.rundir = Path(tempfile.mkdtemp(prefix="refstream-serve-", dir=os.environ.get("XDG_RUNTIME_DIR")))
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.serving = False  # every slot was ready once
        self.failed: str | None = None
        self._signals: list[int] = []

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> int:
        """Bind, start the children, supervise until SIGTERM/SIGINT; the exit code (1 with
        ``failed`` saying why)."""
        try:
            if self.take_over:
                self.predecessor, taken = takeover.take_over(takeover.control_path(self.host, self.port))
                if len(taken) != self.processes:
                    log.warning(
                        "prefork.slots_taken",
                        asked=self.processes,
                        taken=len(taken),
                        why="a take-over serves the sockets it is given: one process each",
                    )
                self.processes = len(taken)
                self.slots = [Slot(i, socks) for i, socks in enumerate(taken)]
                port = self.slots[0].socks[0].getsockname()[1]
            else:
                first = bind(self.host, self.port)
                port = first[0].getsockname()[1]  # --port 0: every slot on the port slot 0 got
                self.slots = [Slot(0, first)] + [Slot(i, bind(self.host, port)) for i in range(1, self.processes)]
            self.port = port
            if self.predecessor is None:
                self._listen_for_successor()
        except BaseException:
            self._cleanup()
            raise
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.sel.register(wake_r, selectors.EVENT_READ)
        if self.predecessor is not None:
            self.sel.register(self.predecessor, selectors.EVENT_READ, "predecessor")
        try:
            for slot in self.slots:
                self._spawn(slot)
            log.info("prefork.starting", processes=self.processes, port=port, rundir=str(self.rundir))
            while not (self.stopping and not self._children()):
                self._step(wake_r)
        finally:
            for child in self._children():  # only on an error of our own: leave nothing behind
                child.proc.kill()
                child.proc.wait()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            self._cleanup()
        if self.failed:
            return 1
        log.info("prefork.stopped")
        return 0

    def _step(self, wake_r: int) -> None:
        now = time.monotonic()
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        timeout = max(0.0, min(due) - now) if due and not self.stopping else None
        for key, _ in self.sel.select(timeout):
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            elif key.data == "control":
                self._on_successor()
            elif key.data == "successor":
                self._on_successor_said()
            elif key.data == "predecessor":
                self._on_predecessor_gone()
            else:
                self._on_ready(key.data, key.fd)
        pending, self._signals = self._signals, []
        for sig in pending:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stop("signal")
            elif sig == signal.SIGHUP and not self.stopping:
                self._reload()
        self._reap()
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self.stopping:
                slot.restart_at = None
                self._spawn(slot)

    def _on_signal(self, sig: int, frame: object) -> None:
        self._signals.append(sig)  # handled in the loop (the wakeup fd ends its select)

    # -- children ----------------------------------------------------------------------
    def _children(self) -> list[Child]:
        return [c for s in self.slots for c in s.children]

    def _spawn(self, slot: Slot) -> None:
        if not slot.socks:
            try:
                slot.socks = bind(self.host, self.port)
            except OSError as exc:
                log.error("prefork.bind_failed", slot=slot.index, error=exc)
                self._backoff(slot)
                return
        ready_r, ready_w = os.pipe()
        fds = [s.fileno() for s in slot.socks]
        argv = [
            *self.child,
            "--fds",
            ",".join(map(str, fds)),
            "--ready",
            str(ready_w),
            "--rundir",
            str(self.rundir),
            "--parent",
            str(os.getpid()),
        ]
        try:
            proc = subprocess.Popen(argv, pass_fds=(*fds, ready_w))
        finally:
            os.close(ready_w)
        child = Child(slot, proc, ready_r)
        slot.children.append(child)
        self.sel.register(ready_r, selectors.EVENT_READ, child)
        log.info("prefork.child_started", slot=slot.index, pid=proc.pid)

    def _on_ready(self, child: Child, fd: int) -> None:
        try:
            said = os.read(fd, 1)
        except OSError:
            said = b""
        self.sel.unregister(fd)
        os.close(fd)
        child.ready_r = -1
        if not said:
            return  # it died before ready: its exit is handled when reaped
        child.ready_at = time.monotonic()
        log.info("prefork.child_ready", slot=child.slot.index, pid=child.pid)
        for old in child.slot.children:  # a reload: the slot's older children drain now
            if old is not child and not old.retiring:
                self._retire(old)
        if not self.serving and all(any(c.ready_at for c in s.children) for s in self.slots):
            self.serving = True
            url = f"http://{self.host}:{self.port}"
            self.print(f"======== Running on {url} ({self.processes} processes) ========\n(Press CTRL+C to quit)")
            if self.predecessor is not None:  # taking over: the old supervisor may drain now
                takeover.say_ready(self.predecessor)
                log.info("prefork.took_over", port=self.port)

    # -- taking over, and being taken over ------------------------------------------------
    def _listen_for_successor(self) -> None:
        path = takeover.control_path(self.host, self.port)
        listener = takeover.listen(path)
        if listener is not None:
            self.control, self.control_at = listener, path
            self.sel.register(listener, selectors.EVENT_READ, "control")

    def _on_successor(self) -> None:
        """A new supervisor asks for the sockets: they are sent, and it says when it serves."""
        assert self.control is not None
        slots = [slot.socks for slot in self.slots]
        conn = takeover.hand_over(self.control, slots, refuse=self.stopping or self.successor is not None)
        if conn is None:
            return
        self.successor = conn
        self.sel.register(conn, selectors.EVENT_READ, "successor")
        log.info("prefork.taking_over", slots=len(self.slots))

    def _on_successor_said(self) -> None:
        assert self.successor is not None
        said = takeover.successor_said(self.successor)
        if said is None:
            return
        if said:
            self._stop("taken over")  # the sockets stay open in the successor: nothing queued is reset
            return
        # it went away before it served: this one serves on, and may be taken over again
        log.warning("prefork.take_over_abandoned")
        self.sel.unregister(self.successor)
        self.successor.close()
        self.successor = None

    def _on_predecessor_gone(self) -> None:
        assert self.predecessor is not None
        if not takeover.predecessor_gone(self.predecessor):
            return
        self.sel.unregister(self.predecessor)  # it has exited (its end closed): the name is ours now
        self.predecessor.close()
        self.predecessor = None
        self._listen_for_successor()

    def _retire(self, child: Child) -> None:
        child.retiring = True
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        for slot in self.slots:
            for child in list(slot.children):
                code = child.proc.poll()
                if code is None:
                    continue
                slot.children.remove(child)
                if child.ready_r >= 0:
                    self.sel.unregister(child.ready_r)
                    os.close(child.ready_r)
                with contextlib.suppress(FileNotFoundError):
                    (self.rundir / f"edge-{child.pid}.sock").unlink()
                log.info("prefork.child_exited", slot=slot.index, pid=child.pid, code=code, retired=child.retiring)
                if child.retiring or self.stopping:
                    continue
                if not self.serving:
                    self.failed = (
                        f"an edge process exited with {code} before it was ready (its error is above);"
                        " fix what it says, or run one process to see it alone: refstream serve --processes 1"
                    )
                    self._stop("failed")
                    continue
                if any(not c.retiring for c in slot.children):
                    continue  # a reload's new child died; the old one still serves the slot
                stable = child.ready_at is not None and time.monotonic() - child.ready_at >= STABLE_S
                if stable:
                    slot.streak = 0
                    slot.restart_at = time.monotonic()
                else:
                    self._backoff(slot)

    def _backoff(self, slot: Slot) -> None:
        slot.streak += 1
        delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (slot.streak - 1))
        slot.restart_at = time.monotonic() + delay
        if slot.streak >= 2 and slot.socks:
            # crashing at start: new connections go to the other slots meanwhile
            for s in slot.socks:
                s.close()
            slot.socks = []
        log.warning("prefork.backoff", slot=slot.index, streak=slot.streak, delay_s=delay)

    def _reload(self) -> None:
        log.info("prefork.reload", processes=self.processes)
        for slot in self.slots:
            slot.restart_at = None
            slot.streak = 0
            self._spawn(slot)

    def _stop(self, why: str) -> None:
        if not self.stopping:
            log.info("prefork.draining", reason=why, children=len(self._children()))
        self.stopping = True
        for child in self._children():
            self._retire(child)

    def _cleanup(self) -> None:
        for slot in self.slots:
            for s in slot.socks:
                s.close()
        if self.control is not None:  # the name first: a successor binds it once we are gone
            self.control.close()
            if self.control_at is not None:
                self.control_at.unlink(missing_ok=True)
        for conn in (self.successor, self.predecessor):
            if conn is not None:
                conn.close()
        shutil.rmtree(self.rundir, ignore_errors=True)


if __name__ == "__main__":  # a child, as Supervisor starts it: ingest.host.prefork_child
    from ingest.host.prefork_child import main

    sys.exit(main(sys.argv[1:]))
