"""A management write whose COMMIT is lost with its connection may be committed: it is
raised as ``OutcomeUnknown`` with the reason ``COMMIT`` (answered 503 with ``Refstream-Outcome: unknown``, never as a
plain refusal), while an error in the transaction's body (rolled back: nothing written)
passes as itself. The backend is ended by ``pg_terminate_backend`` from another connection,
which waits for it to exit: right before the commit, or in the middle of the body."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from ingest.contract.connections import PG_ERRORS, acquired, write
from ingest.contract.errors import OutcomeUnknown, Unknown
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
        assert _commit_unknown(raised.value) == (where == "before the commit"), repr(raised.value)
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


class _DriverBreaksAtCommit(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped: Any
    """A real connection whose driver raises its own ``InternalClientError`` right after a
    COMMIT that Postgres carried out (or before the body's next statement): as asyncpg does
    when the server shuts down in the middle of an exchange."""

    at = "COMMIT;"

    async def execute(self, query: str, *args: object, **kw: object) -> str:
        done: str = await super().execute(query, *args, **kw)
        if query == self.at:
            raise asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress")
        return done


@pytest.mark.parametrize("where", ["at the commit", "in the body"])
async def test_the_drivers_own_error_in_a_write_is_an_outage_and_at_the_commit_unknown(
    pg: asyncpg.Pool, settings: Settings, where: str
) -> None:
    # the generative test's seed 1404771603: Postgres killed as a Bricqs referral code's
    # COMMIT went out; asyncpg raised InternalClientError, which write() let through, and the
    # route answered a plain 503 (a refusal) for a link it had made
    name = f"driver-{uuid.uuid4().hex}"
    conn = await asyncpg.connect(settings.database_url, connection_class=_DriverBreaksAtCommit)
    conn.at = "COMMIT;" if where == "at the commit" else "SELECT 1"
    try:
        with pytest.raises(PG_ERRORS) as raised:  # an outage for every handler either way
            async with write(conn):
                await conn.execute("INSERT INTO workspaces (name) VALUES ($1)", name)
                await conn.execute("SELECT 1")
        assert _commit_unknown(raised.value) == (where == "at the commit"), repr(raised.value)
    finally:
        await conn.close()
    stored = await pg.fetchval("SELECT count(*) FROM workspaces WHERE name = $1", name)
    assert stored == (1 if where == "at the commit" else 0)


def _commit_unknown(exc: BaseException) -> bool:
    return isinstance(exc, OutcomeUnknown) and exc.reason is Unknown.COMMIT
