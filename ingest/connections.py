"""Opening Redis and Postgres: called from startup hooks, never at import time."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .settings import Settings

Redis = aioredis.Redis | RedisCluster

# what "Redis is not answering" looks like (cluster errors are not RedisErrors)
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
# what "Postgres is not answering" looks like, to a request that asked it something (SQLSTATE
# classes 08, 53, 57; a closed connection), and what "Postgres will not give us a session"
# looks like when a pool opens a connection (3D000: the database is gone; class 28: the
# credentials are refused): to the request, the same outage. Anything else is a bug, not
# an outage (and ``ingest.schema_check`` tells the operator which of these it is).
PG_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)

# SQLSTATE classes that say the database cannot serve anyone right now (a read-only standby,
# a schema not migrated, ...): the request is not at fault and may be retried
_PG_UNAVAILABLE_CLASSES = ("08", "25", "28", "3D", "42", "53", "55", "57", "58")


def pg_unavailable(exc: BaseException) -> bool:
    """``exc``, raised by Postgres or its driver, means "not now" rather than a bug."""
    if isinstance(exc, PG_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _PG_UNAVAILABLE_CLASSES
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)


def connect_redis(settings: Settings, *, url: str | None = None, **kwargs: Any) -> Redis:
    """A Redis client (or a cluster client when ``REFSTREAM_REDIS_CLUSTER`` is set).

    Replies stay bytes: the stream entries are bytes and decoding is the caller's choice.
    The socket timeout bounds every call, so a blocking XREADGROUP must block for less.
    """
    opts: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "health_check_interval": 30,
        **kwargs,
    }
    if settings.redis_cluster and url is None:
        cluster: RedisCluster = RedisCluster.from_url(settings.redis_url, **opts)
        return cluster
    client: aioredis.Redis = aioredis.Redis.from_url(url or settings.redis_url, **opts)
    return client


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def create_pg_pool(settings: Settings, *, min_size: int = 1, max_size: int | None = None) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size or settings.pg_pool_size,
        init=_init_connection,
        command_timeout=60,
    )
    assert pool is not None
    return pool
