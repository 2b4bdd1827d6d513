"""Every command fails in one line on stderr, ``Error: <what is wrong>; <what to do>``, and a
non-zero exit; a traceback only with ``--debug`` (or REFSTREAM_DEBUG=1). Real ``refstream``
processes, real servers: a bad setting under its environment variable, an unreachable
Redis or Postgres under host and port, a wrong password with its user, a database missing
or behind with the command that fixes it, a port in use, a Redis database number that does
not exist; one-shot commands give up on an unreachable service after
REFSTREAM_CONNECT_TIMEOUT_S, saying what they waited for. Also ``keys create`` without
``--scopes``, ``--version``, and ``refstream dev`` falling back to an embedded Postgres when
the default one refuses the default credentials (a stock Postgres with a password).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ingest.contract.settings import Settings
from ingest.manage.db import SCHEMA_VERSION
from refstream import services as services_mod
from refstream.embedded import die_with_parent, free_port, pg_install
from refstream.services import Services, with_database

from ._procs import env_for, run_command

# the same in either pass (no server-specific behaviour): scripts/test runs it in the first only
pytestmark = pytest.mark.once

DEBIAN_PG = Path("/usr/lib/postgresql/15/bin")


run = run_command


def one_line(code: int, out: str, err: str) -> str:
    """The failure's single line, asserted to be the whole of stderr, stdout empty."""
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without any refstream setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    env.update(extra)
    return env


def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "env", "want"),
    [
        (["migrate"], {"REFSTREAM_PARTITIONS": "abc"}, "REFSTREAM_PARTITIONS: input should be a valid integer"),
        (["status"], {"REFSTREAM_LOG_JSON": "maybe"}, "REFSTREAM_LOG_JSON: input should be a valid boolean"),
        (
            ["work", "--drain"],
            {"REFSTREAM_TRUSTED_PROXIES": "10.0.0.0/8,nope"},
            "REFSTREAM_TRUSTED_PROXIES: 'nope' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            ["dev"],
            {"REFSTREAM_BLOCK_MS": "9000"},
            "block_ms must stay below redis_socket_timeout_s"
            " (REFSTREAM_BLOCK_MS=9000, REFSTREAM_REDIS_SOCKET_TIMEOUT_S=5)",
        ),
        (
            ["serve"],
            {"REFSTREAM_CONNECT_TIMEOUT_S": "-1"},
            "REFSTREAM_CONNECT_TIMEOUT_S: input should be greater than 0",
        ),
        # each names the variable and the forms it takes, whatever the library would have said
        (
            ["status"],
            {"REDIS_URL": "localhost:6379"},
            "REDIS_URL: a URL such as redis://host:6379/0 (redis://, rediss://, unix:// or redis+sentinel://)",
        ),
        (
            ["link", "show", "demo"],
            {"DATABASE_URL": "localhost:5432"},
            "DATABASE_URL: a URL such as postgresql://user@host:5432/refstream (postgresql:// or postgres://)",
        ),
        (
            ["status"],
            {"REFSTREAM_STREAM_RETENTION_S": "1hour"},
            "REFSTREAM_STREAM_RETENTION_S: seconds, or a number with s, m, h or d: 3600, 90s, 30m, 1h, 2d"
            " (got '1hour')",
        ),
        (
            ["work", "--drain"],
            {"REFSTREAM_STREAM_MAX_BYTES": "1tb"},
            "REFSTREAM_STREAM_MAX_BYTES: bytes, or a number with kb, mb or gb",
        ),
        (
            ["serve"],
            {"REFSTREAM_PROCESSES": "two"},
            "REFSTREAM_PROCESSES: a whole number of edge processes, 1 or more (got 'two')",
        ),
        (
            ["dev"],
            {"REFSTREAM_PROCESSES": "0"},
            "REFSTREAM_PROCESSES: a whole number of edge processes, 1 or more (got '0')",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else next(iter(v)) if isinstance(v, dict) else "",
)
async def test_a_bad_setting_is_named_by_its_environment_variable(
    command: list[str], env: dict[str, str], want: str
) -> None:
    line = one_line(*await run(*command, env=bare_env(**env)))
    assert line.startswith(f"Error: {want}"), line


# -- unreachable, refused, missing, behind ---------------------------------------------------


async def test_an_unreachable_redis_or_postgres_is_named_by_host_and_port() -> None:
    pg, redis = nowhere(), nowhere()
    env = bare_env(DATABASE_URL=f"postgresql://postgres:s3cret@{pg}/refs", REDIS_URL=f"redis://:s3cret@{redis}/2")
    line = one_line(*await run("link", "show", "demo", env=env))
    assert line.startswith(f"Error: postgres at {pg}/refs: unreachable (") and "is Postgres running" in line, line
    line = one_line(*await run("feature", "disable", "referral", env=env))
    assert line.startswith(f"Error: redis at {redis}/2: unreachable (") and "is Redis running" in line, line
    line = one_line(*await run("status", env=env))
    assert line.startswith(f"Error: redis at {redis}/2: unreachable ("), line
    line = one_line(*await run("keys", "revoke", "rs_live_x", env=env))
    assert line.startswith(f"Error: postgres at {pg}/refs: unreachable ("), line

    # the traceback, when asked for; the line still ends it
    for args, extra in ((["--debug"], {}), ([], {"REFSTREAM_DEBUG": "1"})):
        code, _, err = await run(*args, "feature", "disable", "referral", env={**env, **extra})
        assert code == 1 and "Traceback (most recent call last)" in err, err
        assert err.strip().splitlines()[-1].startswith(f"Error: redis at {redis}/2: unreachable ("), err
    assert "s3cret" not in line


def where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


async def test_a_database_missing_or_behind_is_named_with_the_command_that_fixes_it(
    settings: Settings, services: Services, scratch_url: str
) -> None:
    commands = [
        ["link", "show", "demo"],
        ["workspace", "create", "Acme"],
        ["keys", "create", "--workspace", "00000000-0000-0000-0000-000000000000", "--scopes", "read"],
        ["link", "create", "--workspace", "00000000-0000-0000-0000-000000000000", "--code", "x"],
        ["reconcile"],
    ]
    env = env_for(settings, DATABASE_URL=scratch_url)
    for command in commands:
        line = one_line(*await run(*command, env=env))
        assert (
            line == f"Error: postgres at {where(scratch_url)}: database does not exist; run: refstream migrate"
            " (it creates the database)"
        ), (command, line)
    server = await asyncpg.connect(with_database(services.postgres_url, "postgres"))
    try:
        await server.execute(f'CREATE DATABASE "{urlsplit(scratch_url).path.lstrip("/")}"')
    finally:
        await server.close()
    for command in commands:
        line = one_line(*await run(*command, env=env))
        assert line == (
            f"Error: postgres at {where(scratch_url)}: not migrated (schema version 0, expected {SCHEMA_VERSION});"
            " run: refstream migrate"
        ), (command, line)


# -- a password-protected Postgres (stock Debian, Ubuntu, Docker) -------------------------------


class PasswordPostgres:
    """A Postgres of this module's own that wants a password (scram-sha-256) from everyone."""

    password = "right-" + secrets.token_hex(4)

    def __init__(self) -> None:
        self.bin = DEBIAN_PG if (DEBIAN_PG / "initdb").exists() else pg_install(os.geteuid() == 0) / "bin"
        self.base = Path(tempfile.mkdtemp(prefix="refstream-pwpg-"))
        os.chmod(self.base, 0o755)  # the unprivileged server user must traverse it
        self.port = free_port()
        self.uid = self.gid = None
        if os.geteuid() == 0:  # initdb and postgres refuse root
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None, user: str = "postgres") -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        data, pwfile = self.base / "data", self.base / "pw"
        pwfile.write_text(self.password + "\n")
        data.mkdir(mode=0o700)
        if self.uid is not None and self.gid is not None:
            for p in (data, pwfile):
                os.chown(p, self.uid, self.gid)
        done = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            user=self.uid,
            group=self.gid,
            cwd=self.base,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(signal.SIGQUIT),
            user=self.uid,
            group=self.gid,
            cwd=self.base,
        )

    async def ready(self) -> None:
        for _ in range(600):
            assert self.proc is not None and self.proc.poll() is None, "postgres exited"
            try:
                conn = await asyncpg.connect(self.url(self.password), timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return
        raise AssertionError("the password-protected postgres never answered")

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
async def password_postgres() -> AsyncIterator[PasswordPostgres]:
    pg = PasswordPostgres()
    try:
        pg.start()
        await pg.ready()
        yield pg
    finally:
        pg.destroy()


async def test_a_wrong_or_missing_password_names_the_user_and_the_server(password_postgres: PasswordPostgres) -> None:
    at = f"127.0.0.1:{password_postgres.port}/postgres"
    for url in (password_postgres.url("wrong-pw"), password_postgres.url(), password_postgres.url("x", user="alice")):
        user = urlsplit(url).username
        for command in (["link", "show", "demo"], ["migrate"], ["work", "--drain"]):
            line = one_line(*await run(*command, env=bare_env(DATABASE_URL=url)))
            assert line.startswith(f"Error: postgres at {at}: authentication failed ("), (command, line)
            assert f'user "{user}"' in line and "DATABASE_URL" in line and "wrong-pw" not in line, line


def test_dev_falls_back_to_embedded_when_the_default_postgres_refuses_the_default_credentials(
    password_postgres: PasswordPostgres, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default address answers (a stock Postgres with a password): an embedded Postgres
    instead, said in one line; configured (DATABASE_URL), the same answer is an error."""
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    default = password_postgres.url()  # the shape of the stock default: user postgres, no password
    with ExitStack() as stack:
        svc = services_mod.resolve(stack, default_postgres=default)
        assert svc.embedded_postgres and not svc.embedded_redis
        assert svc.postgres_url != default
        (note,) = svc.notes
        assert note.startswith(f"postgres at 127.0.0.1:{password_postgres.port}/postgres refuses the default"), note
        assert "embedded Postgres" in note and "DATABASE_URL" in note and "\n" not in note

        monkeypatch.setenv("DATABASE_URL", password_postgres.url("wrong-pw"))
        with pytest.raises(services_mod.ServiceError, match=r"authentication failed .*DATABASE_URL") as refused:
            services_mod.resolve(stack)
        assert "wrong-pw" not in str(refused.value)


# -- ports, Redis database numbers, timeouts ---------------------------------------------------


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def someone_on_a_port() -> Iterator[int]:
    """Another server on a port: it answers every GET with 200, /healthz included."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_serve_dev_and_console_on_a_port_in_use_fail_in_one_line_and_claim_nothing(
    settings: Settings, someone_on_a_port: int
) -> None:
    port = str(someone_on_a_port)
    for command in ("serve", "dev", "console"):
        line = one_line(*await run(command, "--port", port, env=env_for(settings, REFSTREAM_LOG_FLUSH_MS="0")))
        assert line == (
            f"Error: port {port} on 127.0.0.1 is in use (another refstream {command}?): stop it, or choose another"
            f" port: refstream {command} --port N"
        ), line


async def test_dev_whose_console_port_is_in_use_names_the_option_that_moves_it(
    settings: Settings, someone_on_a_port: int
) -> None:
    env = env_for(settings, REFSTREAM_LOG_FLUSH_MS="0")
    with socket.socket() as held:  # a port whose +10 (the console's default) is taken
        while True:
            port = free_port()
            try:
                held.bind(("127.0.0.1", port + 10))
                break
            except OSError:
                continue
        held.listen()
        for args, taken in (
            (["--port", str(port)], port + 10),
            (["--port", str(free_port()), "--console-port", str(someone_on_a_port)], someone_on_a_port),
        ):
            line = one_line(*await run("dev", *args, env=env))
            assert line == (
                f"Error: port {taken} on 127.0.0.1 is in use (another refstream dev?): stop it, or choose another"
                " port: refstream dev --console-port N"
            ), (args, line)


async def test_a_redis_database_number_that_does_not_exist_fails_at_once(settings: Settings) -> None:
    parts = urlsplit(settings.redis_url)
    url = urlunsplit(parts._replace(path="/99"))  # a stock Redis has 16: 0 to 15
    env = env_for(settings, REDIS_URL=url, REFSTREAM_LOG_FLUSH_MS="0")
    for command in (["dev", "--port", str(free_port())], ["work", "--drain"], ["feature", "enable", "referral"]):
        line = one_line(*await run(*command, env=env, within_s=30))
        assert line == (
            f"Error: redis at {parts.hostname}:{parts.port}/99: refused (DB index is out of range); check the"
            " database number in REDIS_URL (16 by default: 0 to 15)"
        ), (command, line)


async def test_work_drain_gives_up_on_an_unreachable_service_saying_what_it_waited_for(settings: Settings) -> None:
    for var, url, name in (
        ("REDIS_URL", f"redis://{nowhere()}/0", "redis"),
        ("DATABASE_URL", f"postgresql://postgres@{nowhere()}/refs", "postgres"),
    ):
        env = env_for(settings, **{var: url, "REFSTREAM_CONNECT_TIMEOUT_S": "2", "REFSTREAM_LOG_FLUSH_MS": "0"})
        code, out, err = await run("work", "--drain", env=env, within_s=30)
        lines = err.strip().splitlines()
        assert code == 1 and out == "" and "Traceback" not in err, (code, out, err)
        target = where(url)
        waiting = [line for line in lines if f'"{name}.waiting"' in line]
        assert len(waiting) == 1 and target in waiting[0], err  # what it waits for, once
        assert lines[-1].startswith(f"Error: {name} at {target}: unreachable ("), err
        assert lines[-1].endswith("(gave up after 2 s: REFSTREAM_CONNECT_TIMEOUT_S)"), err


# -- keys, version -----------------------------------------------------------------------------


async def test_keys_create_needs_explicit_scopes() -> None:
    env = bare_env(DATABASE_URL=f"postgresql://postgres@{nowhere()}/x")  # refused before any connection
    line = one_line(*await run("keys", "create", "--workspace", "w", env=env))
    assert line.startswith("Error: keys create needs --scopes"), line
    assert all(f"{scope} (" in line for scope in ("read", "write", "track", "*")), line
    line = one_line(*await run("keys", "create", "--workspace", "w", "--scopes", "read,admin", env=env))
    assert line.startswith("Error: unknown scope 'admin'; --scopes takes: read ("), line


async def test_version_is_the_package_version() -> None:
    code, out, err = await run("--version", env=bare_env())
    assert (code, out.strip(), err) == (0, f"refstream, version {version('refstream')}", "")


async def test_a_command_run_as_a_module_says_refstream_in_its_usage_line() -> None:
    """``refstream dev`` runs its edge as ``python -m refstream.cli serve``: a usage error
    there names the command a person types."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "refstream.cli",
        "serve",
        "--processes",
        "x",
        env=bare_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and out == b"", err
    assert err.decode().splitlines()[0] == "Usage: refstream serve [OPTIONS]", err
    assert "Invalid value for '--processes': a whole number of edge processes, 1 or more (got 'x')" in err.decode()
