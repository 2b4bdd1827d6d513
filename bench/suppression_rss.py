"""An edge's memory with a long do-not-track list: ``python -m bench.suppression_rss``.

Not a part of ``python -m bench``, and not a test. It makes a database of its own on the
Postgres at ``--postgres`` (dropped at the end), migrated by the checkout's schema.sql, with
one workspace; starts one edge (``refstream serve``, one process, the checkout's code) on
the Redis at ``--redis`` under a prefix of its own; and reads the edge's resident memory
(VmRSS) once it is up, then again after ``--entries`` entries (default 300,000) are listed
in that workspace and the edge has read them (``REFSTREAM_SUPPRESSION_REFRESH_S`` = 1, read
at 5 s and at 15 s after the insert: the second says whether the growth stayed); then a
second edge's, started with the list there (5 s after it is up); and times one ``GET
/v1/suppressions`` (the bytes it answers).

It runs against whichever code the checkout holds (a ``git worktree`` of an older commit
for the figures before a change: run it there with ``PYTHONPATH`` set to that tree). One
JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from ingest.manage import admin
from ingest.manage.db import migrate
from refstream.embedded import free_port


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _healthy(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the edge exited with {proc.returncode}")
            try:
                async with http.get(f"{base}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the edge did not become healthy")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"refstream_bench_supp_{secrets.token_hex(4)}"
    server = await asyncpg.connect(args.postgres)
    await server.execute(f'CREATE DATABASE "{name}"')
    await server.close()
    url = args.postgres.rsplit("/", 1)[0] + "/" + name
    started: list[subprocess.Popen[bytes]] = []  # the first edge, once started: stopped at the end
    prefix = f"benchsupp:{secrets.token_hex(4)}"
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        ws = await admin.create_workspace(conn, "long list")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
        env.update(
            DATABASE_URL=url,
            REDIS_URL=args.redis,
            REFSTREAM_STREAM_PREFIX=prefix,
            REFSTREAM_PROCESSES="1",
            REFSTREAM_SUPPRESSION_REFRESH_S="1",
            REFSTREAM_SPOOL_DIR=f"/tmp/{name}-spool",
            REFSTREAM_LOG_LEVEL="warning",
        )
        return await _measure(args, conn, ws, env, started)
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(30)
        await _clean_up(args, name, prefix)


async def _measure(
    args: argparse.Namespace,
    conn: asyncpg.Connection,
    ws: dict[str, Any],
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> dict[str, Any]:
    """The first edge's memory before and after the list is inserted, the second edge's
    started with it, and one ``GET /v1/suppressions``; ``conn`` closed at the end."""
    port = free_port()
    cmd = [sys.executable, "-c", "from refstream.cli import main; main()", "serve", "--port", str(port)]
    proc = await asyncio.to_thread(_start, cmd, env)
    started.append(proc)
    base = f"http://127.0.0.1:{port}"
    await _healthy(base, proc)
    await asyncio.sleep(5)
    before = _rss_kb(proc.pid)
    t = time.monotonic()
    await conn.execute(
        "INSERT INTO suppressions (workspace_id, kind, digest, created_by)"
        " SELECT $1, 'visitor', decode(md5('bench' || i), 'hex'), 'bench' FROM generate_series(1, $2) i",
        ws["workspace_id"],
        args.entries,
    )
    insert_s = time.monotonic() - t
    await asyncio.sleep(5)
    after_5s = _rss_kb(proc.pid)
    await asyncio.sleep(10)
    after_15s = _rss_kb(proc.pid)
    started_with = await _started_with_the_list(cmd, env)
    async with aiohttp.ClientSession() as http:
        t = time.monotonic()
        async with http.get(f"{base}/v1/suppressions", headers={"Authorization": f"Bearer {ws['api_key']}"}) as r:
            body = await r.read()
        get_s = time.monotonic() - t
    await conn.close()
    return {
        "entries": args.entries,
        "rss_before_kb": before,
        "rss_after_5s_kb": after_5s,
        "rss_after_15s_kb": after_15s,
        "growth_mb": round((after_15s - before) / 1024, 1),
        "rss_started_with_the_list_kb": started_with,
        "started_with_growth_mb": round((started_with - before) / 1024, 1),
        "insert_s": round(insert_s, 2),
        "get_status": r.status,
        "get_bytes": len(body),
        "get_s": round(get_s, 3),
    }


async def _started_with_the_list(cmd: list[str], env: dict[str, str]) -> int:
    """The resident memory (kB) of an edge started with the list already there: its first
    read is every list (5 s after it is up)."""
    port2 = free_port()
    cmd2 = [*cmd[:-1], str(port2)]
    proc2 = await asyncio.to_thread(_start, cmd2, env)
    try:
        await _healthy(f"http://127.0.0.1:{port2}", proc2)
        await asyncio.sleep(5)
        return _rss_kb(proc2.pid)
    finally:
        proc2.terminate()
        proc2.wait(30)


async def _clean_up(args: argparse.Namespace, name: str, prefix: str) -> None:
    """The run's database dropped, and its keys deleted from Redis."""
    server = await asyncpg.connect(args.postgres)
    await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await server.close()
    r = aioredis.Redis.from_url(args.redis)
    async for key in r.scan_iter(match=f"{prefix}:*"):  # its keys (hash-tagged: {prefix}... too)
        await r.delete(key)
    async for key in r.scan_iter(match=f"{{{prefix}}}*"):
        await r.delete(key)
    await r.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--entries", type=int, default=300_000)
    print(orjson.dumps(asyncio.run(run(p.parse_args()))).decode())


if __name__ == "__main__":
    main()
