"""A management write whose COMMIT is lost with its connection may be committed: it is
raised as ``CommitUnknown`` (answered 503 with ``Refstream-Outcome: unknown``, never as a
plain refusal), while an error in the transaction's body (rolled back: nothing written)
passes as itself. The backend is ended by ``pg_terminate_backend`` from another connection,
which waits for it to exit: right before the commit, or in the middle of the body."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from ingest.contract.connections import PG_ERRORS, CommitUnknown, acquired, write
from ingest.contract.settings import Settings


async def _end(pg: asyncpg.Pool, pid: int) -> None:
    assert await pg.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)


@pytest.mark.parametrize("where", ["before the commit", "in the body"])
async def test_a_connection_lost_in_a_write(pg: asyncpg.Pool, where: str) -> None:
    name = f"lost-{uuid.uuid4().hex}"
    conn = await pg.acquire()
    try:
        with pytest.raises(PG_ERRORS) as raised:  # an outage for every handler either way
            async with write(conn):
                await conn.execute("INSERT INTO workspaces (name) VALUES ($1)", name)
                await _end(pg, conn.get_server_pid())
                if where == "in the body":
                    await conn.execute("SELECT 1")
        # lost with the COMMIT in flight: unknown to the client; lost in the body: rolled back
        assert isinstance(raised.value, CommitUnknown) == (where == "before the commit"), repr(raised.value)
    finally:
        await pg.release(conn)
    # ended before the COMMIT reached it: not written either way (a client cannot tell which)
    assert await pg.fetchval("SELECT count(*) FROM workspaces WHERE name = $1", name) == 0


async def test_a_write_that_commits_returns(pg: asyncpg.Pool) -> None:
    name = f"done-{uuid.uuid4().hex}"
    async with pg.acquire() as conn, write(conn):
        await conn.execute("INSERT INTO workspaces (name) VALUES ($1)", name)
    assert await pg.fetchval("SELECT count(*) FROM workspaces WHERE name = $1", name) == 1


async def test_a_connection_lost_as_it_goes_back_leaves_the_write_answered(
    pg: asyncpg.Pool, settings: Settings
) -> None:
    # the generative test's seed 1339461402: Postgres killed just after a link's COMMIT; the
    # pool's reset of the connection as it went back failed, asyncpg raised that from the
    # release, and the route answered a plain 503 for a link it had made
    async def reset(conn: asyncpg.Connection) -> None:  # Postgres goes away during the reset
        await _end(pg, conn.get_server_pid())
        await conn.execute("SELECT 1")

    name = f"after-{uuid.uuid4().hex}"
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, reset=reset)
    try:
        async with acquired(pool) as conn, write(conn):
            await conn.execute("INSERT INTO workspaces (name) VALUES ($1)", name)
    finally:
        pool.terminate()
    assert await pg.fetchval("SELECT count(*) FROM workspaces WHERE name = $1", name) == 1
