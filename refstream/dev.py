"""`refstream dev`: the whole pipeline on one machine, with demo data, until Ctrl-C.

What it prints, it has: the banner comes once the edge it started answers and the worker
runs, and its commands run as printed (the ``refstream`` of this install, by a path when
it is not on PATH). With ``--data DIR`` a second run finds the first one's data: the
embedded servers keep theirs under ``DIR/embedded``, and the demo API key and the secret
key that encrypts webhook secrets are kept in ``DIR`` (mode 0600).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import click
from pydantic import ValidationError

from ingest.contract import settings as settings_mod
from ingest.contract.connections import REDIS_ERRORS, connect_redis
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import secretbox
from ingest.manage import admin
from ingest.manage.db import ensure_database, migrate
from workers.consumer import partitions

from . import dev_tour, services
from .embedded import die_with_parent

DEMO_CODE = "demo"
DEMO_BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
HEALTHY_WITHIN_S = 30.0


def _keep(path: Path, text: str) -> None:
    """Write a secret only its owner may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)  # it may have existed with a wider mode


def _kept(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text().strip() or None


async def _setup(settings: Settings, key_file: Path | None) -> dict[str, Any]:
    """Migrate, and the demo workspace and link unless they exist; the demo API key when it
    is new or kept (and still valid); the tour's keys for this run."""
    await ensure_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings)
    keys = Keys(settings.stream_prefix, settings.partitions)
    try:
        await migrate(conn)
        s = settings
        await partitions.maintain(
            conn,
            retention_days=s.event_retention_days,
            dedupe_days=s.dedupe_retention_days,
            skew_max_s=s.clock_skew_max_s,
            webhook_days=s.webhook_retention_days,
        )
        try:
            link = await admin.show_link(conn, DEMO_CODE)
        except NotFound:
            pass
        else:
            kept = _kept(key_file)
            valid = kept is not None and await conn.fetchval(
                "SELECT 1 FROM api_keys WHERE key_hash = $1 AND workspace_id = $2 AND revoked_at IS NULL",
                hashlib.sha256(kept.encode()).digest(),
                link["workspace_id"],
            )
            tour = await dev_tour.make_keys(conn, redis, keys, link)
            return {"link": link, "api_key": kept if valid else None, "new": False, "tour": tour}
        ws = await admin.create_workspace(conn, "Demo")
        link = await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=ws["workspace_id"],
            code=DEMO_CODE,
            url="https://example.com/pricing",
        )
        if key_file is not None:
            _keep(key_file, ws["api_key"])
        tour = await dev_tour.make_keys(conn, redis, keys, await admin.show_link(conn, DEMO_CODE))
        return {"link": link, "api_key": ws["api_key"], "new": True, "tour": tour}
    finally:
        await conn.close()
        await redis.aclose()


ROLES = ("edge", "worker", "archiver", "console")  # the processes dev runs, in the order it starts them


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "refstream.cli", *args],
        env=env,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


def _wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout: float = HEALTHY_WITHIN_S, *, name: str = "edge"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the {name} exited with {proc.returncode} (its error is above)")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200 and proc.poll() is None:  # our edge's answer, not another's
                    return
        except OSError:
            time.sleep(0.1)
    raise click.ClickException(f"the {name} did not answer {url} within {timeout:g} s")


def refstream_command() -> str:
    """How to run this install's ``refstream`` from the current directory, as typed."""
    exe = Path(sys.executable).parent / "refstream"
    if not exe.is_file():
        return f"{shlex.quote(sys.executable)} -m refstream.cli"
    found = shutil.which("refstream")
    if found and Path(found).resolve() == exe.resolve():
        return "refstream"
    cwd = Path.cwd()
    if exe.is_relative_to(cwd):
        return shlex.quote(str(exe.relative_to(cwd)))
    return shlex.quote(str(exe))


def _secret_key(data_dir: Path | None) -> tuple[str, str]:
    """The Fernet key that encrypts webhook signing secrets, and where it comes from."""
    given = os.environ.get("REFSTREAM_SECRET_KEY")
    if given:
        return given, "from REFSTREAM_SECRET_KEY"
    path = data_dir / "secret_key" if data_dir is not None else None
    kept = _kept(path)
    if kept is not None:
        assert path is not None
        return kept, f"kept in {path}"
    key = secretbox.generate_key()
    if path is not None:
        _keep(path, key)
        return key, f"kept in {path}"
    return key, "a throwaway: set REFSTREAM_SECRET_KEY, or use --data DIR, to keep it"


def run_dev(port: int, data: str | None = None, console_port: int | None = None) -> None:
    data_dir = Path(data).resolve() if data else None
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        svc = services.resolve(stack, data_dir=str(data_dir / "embedded") if data_dir else None)
        db_url, secret, secret_from, env = _environment(svc, data_dir)
        try:
            settings = Settings(redis_url=svc.redis_url, database_url=db_url)
        except ValidationError as exc:
            raise click.ClickException(settings_mod.explain(exc)) from None
        try:
            demo = asyncio.run(_setup(settings, data_dir / "api_key" if data_dir else None))
        except (*REDIS_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            line = services.explain(exc, redis_url=svc.redis_url, database_url=db_url)
            if line is None:
                raise
            raise click.ClickException(line) from exc
        tour_file = Path(dev_tour.TOUR_FILE).resolve()

        def end_tour() -> None:
            dev_tour.remove(tour_file)
            try:
                asyncio.run(dev_tour.revoke(settings, demo["tour"]))
            except dev_tour.REVOKE_ERRORS as exc:
                click.echo(f"refstream dev: the tour's keys could not be revoked ({exc!r})", err=True)

        stack.callback(end_tour)
        console_port = console_port or port + 10
        children = _start_children(stack, port, console_port, env)
        base = f"http://127.0.0.1:{port}"
        console_base = f"http://127.0.0.1:{console_port}"

        # the handlers before the banner that says Ctrl-C stops it: a Ctrl-C read from the
        # banner would otherwise be lost where SIGINT starts ignored (a background job of a
        # non-interactive shell, as the test suite's embedded pass is)
        stop = {"signal": 0}

        def on_signal(signum: int, frame: object) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        bin_dir = None if refstream_command() == "refstream" else Path(sys.executable).parent
        exports = dev_tour.lines(
            demo["tour"], edge=base, console=console_base, env=env, bin_dir=bin_dir, browser=DEMO_BROWSER
        )
        dev_tour.write(tour_file, exports)
        console_at = (console_base, env["REFSTREAM_CONSOLE_TOKEN"])
        click.echo("\n".join(_banner(base, console_at, svc, db_url, secret, secret_from, demo, data_dir)))
        sys.stdout.flush()
        while not stop["signal"]:
            for name, p in zip(ROLES, children, strict=True):
                if p.poll() is not None:
                    raise click.ClickException(f"the {name} exited with {p.returncode}; stopping")
            time.sleep(0.2)


def _environment(svc: services.Services, data_dir: Path | None) -> tuple[str, str, str, dict[str, str]]:
    """The database URL, the secret key and where it comes from, and the environment the
    processes dev starts run in."""
    db_url = os.environ.get("DATABASE_URL")
    if svc.embedded_postgres or not db_url:
        db_url = services.with_database(svc.postgres_url, "refstream")
    secret, secret_from = _secret_key(data_dir)
    env = {**os.environ, "REDIS_URL": svc.redis_url, "DATABASE_URL": db_url, "REFSTREAM_SECRET_KEY": secret}
    # the console's operator token: as given, else a throwaway for this run (printed below)
    env["REFSTREAM_CONSOLE_TOKEN"] = os.environ.get("REFSTREAM_CONSOLE_TOKEN") or secrets.token_urlsafe(24)
    if data_dir is not None and "REFSTREAM_ARCHIVE_URL" not in os.environ:
        env["REFSTREAM_ARCHIVE_URL"] = str(data_dir / "archive")  # kept with the rest of --data
    return db_url, secret, secret_from, env


def _start_children(
    stack: ExitStack, port: int, console_port: int, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """The edge, the worker, the archiver and the console (``ROLES``' order), stopped when
    ``stack`` closes; returned once the edge and the console answer and none has exited."""
    # the archiver from the start: its consumer group holds the trim back for what it has
    # not archived yet, so nothing leaves Redis unarchived (and replays can read it back)
    # one edge process unless REFSTREAM_PROCESSES says otherwise: a development box
    # starts faster and reads one process's log lines
    edge = ["serve", "--port", str(port), "--processes", env.get("REFSTREAM_PROCESSES") or "1"]
    console = ["console", "--port", str(console_port)]
    children = [_spawn(edge, env), _spawn(["work"], env), _spawn(["archive"], env), _spawn(console, env)]

    def stop_children() -> None:
        for p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in children:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    stack.callback(stop_children)
    _wait_healthy(f"http://127.0.0.1:{port}/healthz", children[0])
    _wait_healthy(f"http://127.0.0.1:{console_port}/static/console.css", children[3], name="console")
    for name, p in zip(ROLES[1:], children[1:], strict=True):
        if p.poll() is not None:
            raise click.ClickException(f"the {name} exited with {p.returncode} (its error is above)")
    return children


def _banner(
    base: str,
    console: tuple[str, str],
    svc: services.Services,
    db_url: str,
    secret: str,
    secret_from: str,
    demo: dict[str, Any],
    data_dir: Path | None,
) -> list[str]:
    emb = [n for n, e in (("Redis", svc.embedded_redis), ("Postgres", svc.embedded_postgres)) if e]
    kept = f"kept in {data_dir / 'embedded'}" if data_dir else "deleted on exit"
    cli = f"REDIS_URL={shlex.quote(svc.redis_url)} DATABASE_URL={shlex.quote(db_url)} {refstream_command()}"
    lines = [
        "",
        f"refstream dev: edge on {base}, one worker, one archiver"
        + (f"; embedded {' and '.join(emb)} ({kept})" if emb else ""),
        # the operator's pages ask for the token; Tenant links take a key of scope read
        f"  console on {console[0]}/ (operator token {console[1]}; Tenant links take a key of scope read:"
        " $RS_MANAGE_KEY)",
        *(f"  note: {note}" for note in svc.notes),
        f"  REDIS_URL={svc.redis_url}",
        f"  DATABASE_URL={db_url}",
        f"  REFSTREAM_SECRET_KEY={secret}  (encrypts webhook secrets; {secret_from})",
    ]
    key_file = data_dir / "api_key" if data_dir else None
    if demo["api_key"] and demo["new"]:
        where = f"kept in {key_file}" if key_file else "shown once"
        lines.append(f"  demo workspace API key (scope *, {where}): {demo['api_key']}")
    elif demo["api_key"]:
        lines.append(f"  demo workspace API key (scope *, kept in {key_file}): {demo['api_key']}")
    else:
        lines += [
            "  the demo workspace exists already (its first API key was shown when it was made); a new key:",
            f"    {cli} keys create --workspace {demo['link']['workspace_id']} --scopes track,read,write",
        ]
    lines += [
        "",
        "Track a click on the demo link (as a browser would: curl's own User-Agent counts as a bot click):",
        f"  curl -X POST -A '{DEMO_BROWSER}' {base}/api/v1/referral/click/{DEMO_CODE}",
        "Then see its counter move:",
        f"  {cli} link show {DEMO_CODE}",
        "",
        "The README's tour, in another shell (the demo's ids and this run's API keys, as $RS_* variables):",
        f"  cd {shlex.quote(str(Path.cwd()))} && source {dev_tour.TOUR_FILE}",
        "",
        "Ctrl-C stops everything.",
    ]
    return lines
