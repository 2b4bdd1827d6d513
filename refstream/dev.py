"""`refstream dev`: the whole pipeline on one machine, with demo data, until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

import asyncpg
import click

from ingest import admin, secretbox
from ingest.connections import connect_redis
from ingest.db import ensure_database, migrate
from ingest.keys import Keys
from ingest.settings import Settings

from . import services
from .embedded import die_with_parent

DEMO_CODE = "demo"
DEMO_BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"


async def _setup(settings: Settings) -> dict[str, Any]:
    await ensure_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings)
    try:
        await migrate(conn)
        try:
            return {"link": await admin.show_link(conn, DEMO_CODE), "api_key": None}
        except admin.NotFound:
            pass
        ws = await admin.create_workspace(conn, "Demo")
        link = await admin.create_link(
            conn,
            redis,
            Keys(settings.stream_prefix, settings.partitions),
            workspace_id=ws["workspace_id"],
            code=DEMO_CODE,
            url="https://example.com/pricing",
        )
        return {"link": link, "api_key": ws["api_key"]}
    finally:
        await conn.close()
        await redis.aclose()


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "refstream.cli", *args],
        env=env,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the edge exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise click.ClickException(f"the edge did not answer {url} within {timeout}s")


def run_dev(port: int) -> None:
    with ExitStack() as stack:
        svc = services.resolve(stack)
        db_url = os.environ.get("DATABASE_URL")
        if svc.embedded_postgres or not db_url:
            db_url = services.with_database(svc.postgres_url, "refstream")
        env = {**os.environ, "REDIS_URL": svc.redis_url, "DATABASE_URL": db_url}
        # webhook signing secrets are stored encrypted: a throwaway key unless one is given
        env.setdefault("REFSTREAM_SECRET_KEY", secretbox.generate_key())
        settings = Settings(redis_url=svc.redis_url, database_url=db_url)
        demo = asyncio.run(_setup(settings))

        children = [_spawn(["serve", "--port", str(port)], env), _spawn(["work"], env)]

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
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/healthz", children[0])

        emb = [n for n, e in (("Redis", svc.embedded_redis), ("Postgres", svc.embedded_postgres)) if e]
        lines = [
            "",
            f"refstream dev: edge on {base}, one worker"
            + (f"; embedded {' and '.join(emb)} (deleted on exit)" if emb else ""),
            f"  REDIS_URL={svc.redis_url}",
            f"  DATABASE_URL={db_url}",
            f"  REFSTREAM_SECRET_KEY={env['REFSTREAM_SECRET_KEY']}  (encrypts webhook secrets; keep it to reuse them)",
        ]
        if demo["api_key"]:
            lines.append(f"  demo workspace API key (shown once): {demo['api_key']}")
        lines += [
            "",
            "Track a click on the demo link (as a browser would: curl's own User-Agent counts as a bot click):",
            f"  curl -X POST -A '{DEMO_BROWSER}' {base}/api/v1/referral/click/{DEMO_CODE}",
            "Then see its counter move:",
            f"  REDIS_URL={svc.redis_url} DATABASE_URL={db_url} refstream link show {DEMO_CODE}",
            "",
            "Ctrl-C stops everything.",
        ]
        click.echo("\n".join(lines), err=False)
        sys.stdout.flush()

        stop = {"signal": 0}

        def on_signal(signum: int, frame: object) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop["signal"]:
            if any(p.poll() is not None for p in children):
                raise click.ClickException("a child process exited; stopping")
            time.sleep(0.2)
