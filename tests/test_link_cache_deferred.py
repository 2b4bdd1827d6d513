"""A management write that committed is never refused for its link cache: with Redis gone
after the commit, creating a link answers with the link (no exception, so no 503 whose
retry would meet "code taken"), and the cache write lands once Redis is back."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from ingest.contract import links
from ingest.contract.keys import Keys
from ingest.manage import admin

from ._redis import PrivateRedis
from .conftest import wait_for


async def test_a_committed_link_is_answered_and_cached_once_redis_returns(
    pg: asyncpg.Pool, keys: Keys, private_redis: PrivateRedis
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        async with pg.acquire() as conn:
            ws = await admin.create_workspace(conn, "T")
            private_redis.kill()  # after the workspace, before the link: the cache write fails
            made = await admin.create_link(conn, client, keys, workspace_id=ws["workspace_id"], code="later")
            assert made["code"] == "later"
            assert await conn.fetchval("SELECT count(*) FROM links WHERE code = 'later'") == 1
        private_redis.start()  # the same port: the retry in the background finds it

        async def cached() -> bool:
            try:
                return isinstance(links.decode(await client.get(keys.link("later"))), links.LinkInfo)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                return False

        await wait_for(cached, timeout=30, what="the deferred link cache write")
    finally:
        await client.aclose()


class _ClosedUnderTheCommand(Connection):
    """A connection redis-py's own disconnect leaves without a writer under a command still
    writing: what a Redis killed mid-command did to the edge's management write (redis-py
    then raises its own AttributeError or, under uvloop, RuntimeError, not a ConnectionError)."""

    closed_under = True

    async def _send_packed_command(self, command: Any) -> None:
        if type(self).closed_under:
            self._writer = None
        await super()._send_packed_command(command)


async def test_a_connection_closed_under_the_cache_write_defers_it_and_answers_the_link(
    pg: asyncpg.Pool, keys: Keys, private_redis: PrivateRedis
) -> None:
    """The generative test's seed 2026520494: ``POST /v1/links`` answered 500 for a link it had
    committed, and its retries were refused: a write that moved something."""
    pool = aioredis.ConnectionPool.from_url(
        private_redis.url, socket_timeout=5, connection_class=_ClosedUnderTheCommand
    )
    client = aioredis.Redis(connection_pool=pool)
    try:
        async with pg.acquire() as conn:
            ws = await admin.create_workspace(conn, "T")
            made = await admin.create_link(conn, client, keys, workspace_id=ws["workspace_id"], code="closed")
            assert made["code"] == "closed"
        _ClosedUnderTheCommand.closed_under = False  # redis-py's next connection is a sound one

        async def cached() -> bool:
            return isinstance(links.decode(await client.get(keys.link("closed"))), links.LinkInfo)

        await wait_for(cached, timeout=30, what="the deferred link cache write")
    finally:
        _ClosedUnderTheCommand.closed_under = True
        await client.aclose()
