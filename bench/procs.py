"""Child processes of the bench: the edge and workers through the ``refstream`` console
script of this venv, the reference apps through ``python -m``. Every child gets a
parent-death signal, and ``Procs.stop_all`` (run from a ``finally``) stops the rest, so
nothing outlives the bench, Ctrl-C included.

A child's peak RSS (goal g) is its ``VmHWM``, read while it runs: by a sampler thread
every ``SAMPLE_S``, at every ``alive()`` that finds it running and just before it is
stopped. Never the ``ru_maxrss`` that ``wait4`` gives once it exits: a child begins as a
fork of the bench, and exec keeps the high-water mark of that copy of the bench's memory
in the child's ``ru_maxrss``, so a worker started while the bench held 400 MB "peaked"
at 400 MB whatever it used itself (runs 2 and 3 of a bench, whose process had grown).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from refstream.embedded import die_with_parent, free_port

from .wrk import peak_rss_mb

REFSTREAM = str(Path(sys.executable).parent / "refstream")
SAMPLE_S = 0.2


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    base_url: str = ""
    peak_rss_mb: float = 0.0  # the highest VmHWM read while it ran
    wall_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # reaping and reading /proc/<pid> exclude each other: a reaped pid may be reused
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        with self._lock:
            return self.popen.returncode is None and self._reap(os.WNOHANG)

    def _reap(self, flags: int) -> bool:
        """True while running (its peak RSS read); reaps (and records wall time) once exited."""
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            return False
        if pid == 0:
            self._sample()
            return True
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.wall_s = time.monotonic() - self.started
        return False

    def _sample(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb(self.pid))

    def current_peak_rss_mb(self) -> float:
        with self._lock:
            if self.popen.returncode is None:
                self._sample()
            return self.peak_rss_mb

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout}s")
            time.sleep(0.02)
        assert self.popen.returncode is not None
        return self.popen.returncode

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.current_peak_rss_mb()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.wait(timeout)
        except TimeoutError:
            self.popen.kill()
            self.wait(5)


class Procs:
    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.running: list[Proc] = []
        self._n = 0
        threading.Thread(target=self._sampler, name="rss-sampler", daemon=True).start()

    def _sampler(self) -> None:
        while True:  # for the bench's lifetime (a daemon thread); Procs outlives each run
            time.sleep(SAMPLE_S)
            for p in list(self.running):
                p.current_peak_rss_mb()

    def start(self, name: str, argv: list[str], **env: str) -> Proc:
        self._n += 1
        with open(self.logdir / f"{self._n:02d}-{name}.log", "wb") as log:
            popen = subprocess.Popen(
                argv,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            )
        proc = Proc(name, popen)
        self.running.append(proc)
        return proc

    def refstream(self, name: str, *args: str, **env: str) -> Proc:
        return self.start(name, [REFSTREAM, *args], **env)

    def server(self, name: str, argv: list[str], port: int, **env: str) -> Proc:
        """Start a server and wait until its /healthz answers."""
        return self.healthy(self.start_server(name, argv, port, **env))

    def start_server(self, name: str, argv: list[str], port: int, **env: str) -> Proc:
        """Start a server without waiting for it (``healthy`` waits), so several start at once."""
        proc = self.start(name, argv, **env)
        proc.base_url = f"http://127.0.0.1:{port}"
        return proc

    def healthy(self, proc: Proc) -> Proc:
        """Wait until a server's /healthz answers (60 s at most)."""
        name = proc.name
        deadline = time.monotonic() + 60
        while True:
            if not proc.alive():
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}: {self.tail(name)}")
            try:
                with urllib.request.urlopen(proc.base_url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy within 60 s: {self.tail(name)}")
            time.sleep(0.05)

    def edge(self, **env: str) -> Proc:
        return self.healthy(self.start_edge(**env))

    def start_edge(self, name: str = "edge", **env: str) -> Proc:
        port = free_port()
        return self.start_server(name, [REFSTREAM, "serve", "--port", str(port)], port, **env)

    def app(self, which: str, *args: str) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "bench.apps", which, "--port", str(port), *args]
        return self.server(which, argv, port)

    def tail(self, name: str) -> str:
        logs = sorted(self.logdir.glob(f"*-{name}.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else ""

    def stop_all(self) -> None:
        for p in self.running:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        for p in self.running:
            p.stop()
        self.running.clear()
