"""A Postgres server of the bench's own, for a part that needs a primary no one else uses
(part shards: each shard its own server). It runs the machine's PostgreSQL 15 binaries
(Debian's) where they exist, else the embedded package's, as the fault suite's servers do.
initdb and postgres refuse root, so as root they run as ``nobody``.

The server keeps initdb's settings but for where it listens: fsync and synchronous commit
on, as Postgres ships and as the machine's own server runs. The postmaster is the bench's
child, started from the main thread with a parent-death signal, so it dies with the bench;
``stop`` shuts it down fast and deletes its data directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from refstream.embedded import die_with_parent, free_port, pg_install

DEBIAN_PG = Path("/usr/lib/postgresql/15/bin")
START_S = 60.0


def _pg_bin() -> Path:
    if all((DEBIAN_PG / b).exists() for b in ("initdb", "postgres")):
        return DEBIAN_PG
    return pg_install(os.geteuid() == 0) / "bin"


class PrivatePostgres:
    """``start()`` (from the main thread), ``await ready()``, then ``url_for(db)``; ``stop()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bin = _pg_bin()
        self.base = Path(tempfile.mkdtemp(prefix=f"refstream-bench-{name}-"))
        os.chmod(self.base, 0o755)  # the unprivileged server user must traverse it
        self.data, self.sock, self.log = self.base / "data", self.base / "sock", self.base / "postgres.log"
        self.port = free_port()
        self.uid: int | None = None
        self.gid: int | None = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        """Server level: the ``postgres`` database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def init(self) -> None:
        """initdb (seconds: may run in a thread)."""
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            self._own(d)
        self.log.touch()
        self._own(self.log)
        done = subprocess.run(
            [
                *(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
                *("--no-sync", "--no-instructions"),
            ],
            capture_output=True,
            cwd=self.base,
            user=self.uid,
            group=self.gid,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.sock}'\n"
                "max_connections = 200\n"
            )

    def start(self) -> None:
        """The postmaster, from the main thread: the parent-death signal is tied to the
        thread that forks it."""
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data)],
                preexec_fn=lambda: die_with_parent(signal.SIGQUIT),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=self.base,
                user=self.uid,
                group=self.gid,
            )

    async def ready(self) -> None:
        """Until a session can be opened (``START_S`` at most)."""
        deadline = time.monotonic() + START_S
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: postgres exited with {self.proc.returncode}: {self.tail()}")
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name}: postgres not ready after {START_S:.0f} s: {self.tail()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster), then its directory deleted."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
