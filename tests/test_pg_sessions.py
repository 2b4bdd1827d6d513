"""A process frozen inside a transaction (SIGSTOP, a VM stall) would hold its row locks, and
every other worker behind them, until it ran again. Postgres ends such a session after
``REFSTREAM_PG_IDLE_IN_TRANSACTION_MS``: the locks go with it, and the others carry on."""

from __future__ import annotations

import uuid

import asyncpg

from ingest.contract.connections import create_pg_pool
from ingest.contract.settings import Settings

from .conftest import wait_for


async def test_a_session_idle_in_a_transaction_is_ended_and_its_locks_released(
    settings: Settings, pg: asyncpg.Pool
) -> None:
    name = f"locked-{uuid.uuid4().hex}"
    ws = await pg.fetchval("INSERT INTO workspaces (name) VALUES ($1) RETURNING id", name)
    # 2 s: the session must not be ended between BEGIN and the UPDATE, on a loaded machine
    frozen_pool = await create_pg_pool(settings.model_copy(update={"pg_idle_in_transaction_ms": 2000}), min_size=1)
    try:
        frozen = await frozen_pool.acquire()
        pid = frozen.get_server_pid()
        tx = frozen.transaction()
        await tx.start()
        await frozen.execute("UPDATE workspaces SET name = name || '-held' WHERE id = $1", ws)
        # ...and the process stops here, inside its transaction, holding the row's lock

        async def ended() -> bool:
            return not await pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

        await wait_for(ended, timeout=20, what="Postgres to end the session idle in its transaction")
        async with pg.acquire() as other, other.transaction():
            await other.execute("SET LOCAL lock_timeout = '2s'")  # would fail if the lock were still held
            await other.execute("UPDATE workspaces SET name = $2 WHERE id = $1", ws, name + "-next")
        assert await pg.fetchval("SELECT name FROM workspaces WHERE id = $1", ws) == name + "-next"
    finally:
        frozen_pool.terminate()
