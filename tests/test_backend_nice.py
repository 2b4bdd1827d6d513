"""An import's ``--nice`` carried to its Postgres backends (workers/ops/backend_nice.py),
against the real Postgres: the backend of a TCP connection from this machine is reniced by
exactly the amount asked; a connection whose far end is not this machine's socket, or a
Unix socket, renices nothing and says why."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.contract.settings import Settings
from workers.ops import backend_nice


def _may_renice(pid: int) -> bool:
    """Root, or the backend runs as this process's user."""
    return os.geteuid() == 0 or Path(f"/proc/{pid}").stat().st_uid == os.geteuid()


async def test_a_local_backend_is_reniced_by_the_amount_asked(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        pid = conn.get_server_pid()
        if not Path(f"/proc/{pid}").exists():
            pytest.skip("Postgres runs in another pid namespace or host: nothing here to renice")
        before = os.getpriority(os.PRIO_PROCESS, pid)
        outcome = await backend_nice.lower(conn, 3)
        assert outcome.pid == pid
        if _may_renice(pid):
            assert outcome == backend_nice.Outcome(pid, True, ""), outcome
            assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, before + 3)
        else:
            assert not outcome.applied and outcome.why, outcome
            assert os.getpriority(os.PRIO_PROCESS, pid) == before
        assert await conn.fetchval("SELECT 1") == 1  # the session goes on as before
    finally:
        await conn.close()


async def test_nothing_is_reniced_at_nice_0(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        outcome = await backend_nice.lower(conn, 0)
        assert (outcome.applied, outcome.why) == (False, "--nice 0")
    finally:
        await conn.close()


def test_only_a_socket_with_exactly_those_ends_is_found() -> None:
    """/proc/net/tcp read as the kernel writes it: a listening socket's own connection is
    found by its two ends, and not with one end's port changed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        local, remote = client.getsockname(), client.getpeername()
        found = backend_nice.socket_inodes(local, remote)
        assert found == {os.fstat(client.fileno()).st_ino}
        assert backend_nice.holds_socket(os.getpid(), found)
        assert backend_nice.socket_inodes(local, (remote[0], remote[1] ^ 1)) == set()
        assert not backend_nice.holds_socket(os.getpid(), {1})  # no such socket among our files
    finally:
        for s in (client, accepted, server):
            s.close()


async def test_a_unix_socket_connection_renices_nothing(settings: Settings, pg: Any) -> None:
    directory = await pg.fetchval("SELECT setting FROM pg_settings WHERE name = 'unix_socket_directories'")
    port = await pg.fetchval("SELECT setting::int FROM pg_settings WHERE name = 'port'")
    path = next((d.strip() for d in (directory or "").split(",") if d.strip()), "")
    if not path or not Path(path, f".s.PGSQL.{port}").exists():
        pytest.skip("this Postgres listens on no Unix socket here")
    database = await pg.fetchval("SELECT current_database()")
    user = await pg.fetchval("SELECT current_user")
    try:
        conn = await asyncpg.connect(host=path, port=port, database=database, user=user)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"the Unix socket takes no connection here: {exc!r}")
    try:
        before = os.getpriority(os.PRIO_PROCESS, conn.get_server_pid())
        outcome = await backend_nice.lower(conn, 5)
        assert (outcome.applied, outcome.why) == (False, "not a TCP connection")
        assert os.getpriority(os.PRIO_PROCESS, conn.get_server_pid()) == before
    finally:
        await conn.close()
