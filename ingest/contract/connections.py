"""Opening Redis and Postgres: called from startup hooks, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisClusterException, RedisError

from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.sentinel_url import sentinel_target
from ingest.contract.settings import Settings

Redis = aioredis.Redis | RedisCluster
Command = tuple[Any, ...]  # one Redis command: its name, then its arguments

# what "Redis is not answering" looks like (cluster errors are not RedisErrors)
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
# what "Postgres is not answering" looks like, to a request that asked it something (SQLSTATE
# classes 08, 53, 57; a closed connection), and what "Postgres will not give us a session"
# looks like when a pool opens a connection (3D000: the database is gone; class 28: the
# credentials are refused): to the request, the same outage. Anything else is a bug, not
# an outage (and ``ingest.manage.schema_check`` tells the operator which of these it is).
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


class ConnectionLost(NotSent, OSError):
    """Postgres's connection was lost in a write's body: nothing was committed."""


@contextlib.asynccontextmanager
async def write(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """``conn.transaction()``, with a COMMIT lost with its connection raised as the outcome
    unknown ``Unknown.COMMIT`` (the write may be committed: an ``OSError``, so every outage
    handler still answers it as one; the management routes answer it 503 with
    ``Refstream-Outcome: unknown``, never as a plain refusal); the body's own errors (rolled
    back: nothing written) pass unchanged."""
    body_done = False
    try:
        async with conn.transaction():
            yield
            body_done = True
    except (*PG_ERRORS, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        # InternalClientError: the driver's own state broken by a server going away
        # ("cannot switch to state ...; another operation is in progress")
        if body_done and not isinstance(exc, OutcomeUnknown):
            raise OutcomeUnknown(f"the commit's outcome is unknown: {exc!r}", Unknown.COMMIT) from exc
        if isinstance(exc, asyncpg.InternalClientError) or (
            isinstance(exc, asyncpg.InterfaceError) and _LOST.search(str(exc))
        ):
            # the body lost the connection (the pool detaches a terminated one), or then its
            # rollback could not run: nothing was committed, an outage and not a bug
            raise ConnectionLost(f"the connection was lost in a write: {exc!r}") from exc
        raise


@contextlib.asynccontextmanager
async def acquired(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """``pool.acquire()``, without the release's own failure: asyncpg resets a connection
    as it goes back and raises what the reset met (Postgres gone just after a commit), which
    would turn a write that committed into a refusal. The pool closes such a connection."""
    conn = await pool.acquire()
    try:
        yield conn
    finally:
        try:
            await pool.release(conn)
        # InternalClientError: the driver's own state broken by the server going away mid-reset
        except (*PG_ERRORS, asyncpg.InterfaceError, asyncpg.PostgresError, asyncpg.InternalClientError):
            pass


# asyncpg's words for a connection that is gone (an InterfaceError, not an outage's class)
_LOST = re.compile(r"connection is closed|connection has been released back to the pool")


# SQLSTATE class (or full code) -> why the database cannot serve anyone right now; the
# request or batch is not at fault and is retried. The worker reports these reasons.
PG_OUTAGES: tuple[tuple[str, str], ...] = (
    ("25006", "postgres_read_only"),  # read_only_sql_transaction: a standby, or read-only mode
    ("08", "postgres_unavailable"),  # connection exception
    ("53", "postgres_resources"),  # disk full, out of memory, too many connections
    ("57", "postgres_shutdown"),  # admin shutdown, crash shutdown, cannot connect now, cancelled
    ("58", "postgres_system"),  # I/O error
    ("42", "postgres_schema"),  # undefined table or column, permissions: the schema, not the data
    ("3D", "postgres_schema"),  # the database does not exist
    ("28", "postgres_auth"),  # invalid authorization (a rotated password)
    ("40", "postgres_contention"),  # deadlock or serialization failure past the in-place retries
    ("55", "postgres_contention"),  # lock not available, object in use
    ("0A000", "postgres_schema"),  # a cached statement the schema changed under: fresh connections
    ("XX001", "postgres_corrupt"),  # data corrupted: an operator's matter, not the entry's
    ("XX002", "postgres_corrupt"),  # index corrupted
)


def pg_outage(exc: BaseException) -> str | None:
    """The outage reason for an error raised while talking to Postgres, or None when the
    error is about the data sent (or a bug)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state == "23514" and not getattr(exc, "constraint_name", None):
            # a partition constraint (it has no name; every CHECK of ours has one): the row
            # was routed by a partition map that a concurrent ATTACH PARTITION changed (a day
            # made while batches insert into the default partition); routed again, it fits
            return "postgres_contention"
        return next((reason for prefix, reason in PG_OUTAGES if state.startswith(prefix)), None)
    if isinstance(exc, ValueError):
        return None  # asyncpg's client-side DataError is an InterfaceError and a ValueError
    if isinstance(exc, asyncpg.InterfaceError | OSError | asyncio.TimeoutError | ConnectionError):
        return "postgres_unavailable"  # connection closed under us, refused, timed out
    if isinstance(exc, asyncpg.InternalClientError):
        # the driver's own state, e.g. "cannot switch to state 15; another operation is in
        # progress" when the server shuts down in the middle of a batch: not the data's
        return "postgres_unavailable"
    return None


def pg_unavailable(exc: BaseException) -> bool:
    """``exc``, raised by Postgres or its driver, means "not now" rather than a bug."""
    return isinstance(exc, PG_ERRORS) or pg_outage(exc) is not None


class SentinelRedis(aioredis.Redis):
    """The client of a Sentinel-managed primary: each new connection asks the sentinels
    where the primary is (and READONLY on a connection drops it, see redis-py's
    ``SentinelManagedConnection``). Closing it closes the sentinels' connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        await super().aclose(close_connection_pool)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


class Cluster(RedisCluster):
    """redis-py's cluster client that never runs out of nodes to ask.

    On a connection error redis-py drops the failing node from its startup nodes and closes
    every node's connections; the blocked reads on healthy nodes then fail too and drop
    theirs, until none is left and every command raises "at least one reachable node" for
    good (a primary SIGKILLed under load did it: redis-py #3693). Before each
    re-initialisation, every node this client was given or has seen goes back on the list,
    so it finds the promoted replica and the nodes that never failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seeds = dict(self.nodes_manager.startup_nodes)

    async def initialize(self) -> Cluster:
        if self._initialize:
            nodes = self.nodes_manager
            for name, node in (*self._seeds.items(), *nodes.nodes_cache.items()):
                nodes.startup_nodes.setdefault(name, node)
        await super().initialize()
        return self

    async def refresh(self) -> None:
        """Read the slots again from every node known (a slot answered MOVED, a node was
        lost): what redis-py does after a connection error, for a caller with its own
        connections (the edge's ``ClusterLink``)."""
        self._initialize = True
        await self.initialize()


_CLIENT_CODE = tuple(os.path.join("redis", "asyncio", f) for f in ("connection.py", "cluster.py"))


def cancelled_meanwhile() -> None:
    """Raise ``CancelledError`` if the running task was asked to stop. A client library's own
    timeout can turn a cancel that lands as it fires into its timeout error (redis-py's
    reads do); a loop that waits out errors would then wait on for ever, and a close that
    awaits it with it. Call it where such a loop catches an error and goes on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def client_fault(exc: BaseException) -> bool:
    """A RuntimeError or AttributeError raised inside redis-py's connection or cluster code,
    not ours: a connection or node closed under a command still using it (a Cluster primary
    failing over makes redis-py close every node's connections at once: the transport is
    closed, the writer or the default node is None). It is an outage, like a refused
    connection; callers raise ``ConnectionError`` from it or count it as one."""
    if not isinstance(exc, RuntimeError | AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_CLIENT_CODE):
            return True
        tb = tb.tb_next
    return False


def connect_redis(settings: Settings, *, url: str | None = None, **kwargs: Any) -> Redis:
    """A Redis client: a cluster client when ``REFSTREAM_REDIS_CLUSTER`` is set, the
    primary's through Sentinel for a ``redis+sentinel://`` URL, else a plain one.

    Replies stay bytes: the stream entries are bytes and decoding is the caller's choice.
    The socket timeout bounds every call, so a blocking XREADGROUP must block for less.
    """
    opts: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 30,
        **kwargs,
    }
    target = sentinel_target(url or settings.redis_url)
    if target is not None:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.sentinels,
            sentinel_kwargs={k: v for k, v in opts.items() if k.startswith("socket_")},
        )
        client: aioredis.Redis = sentinel.master_for(
            target.master,
            redis_class=SentinelRedis,
            db=target.db,
            username=target.username,
            password=target.password,
            **opts,
        )
        return client
    if settings.redis_cluster and url is None:
        cluster: RedisCluster = Cluster.from_url(settings.redis_url, **opts)
        return cluster
    plain: aioredis.Redis = aioredis.Redis.from_url(url or settings.redis_url, **opts)
    return plain


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


class PgConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg ships no types: Any
    """A pool's connection (``create_pg_pool``): asyncpg's, with what lives as long as it does.

    - ``kept``: what a caller may remember of this connection's server for as long as the
      connection lives, by the caller's name (``workers.consumer.devices``' dictionary ids).
      A connection ends with its server (a restart, a failover: the standby promoted is
      another server, perhaps without the last commits), so nothing kept here outlives
      the server that said it.
    - ``skip_next_reset``: its holder ran only statements that leave no session state, so
      the pool's reset as it comes back (one round trip: advisory locks, cursors, LISTEN,
      settings) is skipped once. An open transaction is still rolled back (asyncpg's own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: dict[str, Any] = {}
        self._reset_needless = False

    def skip_next_reset(self) -> None:
        self._reset_needless = True

    def reset_needless(self) -> bool:
        """Once: whether the pool may skip this release's reset."""
        needless, self._reset_needless = self._reset_needless, False
        return needless


def kept(conn: Any) -> dict[str, Any] | None:
    """``PgConnection.kept`` of a pool's connection (through the pool's proxy), else None
    (a connection made another way remembers nothing)."""
    held = getattr(conn, "kept", None)
    return held if isinstance(held, dict) else None


def skip_next_reset(conn: Any) -> None:
    """``PgConnection.skip_next_reset`` of a pool's connection; nothing for another."""
    mark = getattr(conn, "skip_next_reset", None)
    if mark is not None:
        mark()


async def _reset(conn: asyncpg.Connection) -> None:
    # the pool's reset: asyncpg's query, unless the holder said it left nothing to reset
    if isinstance(conn, PgConnection) and conn.reset_needless():
        return
    if query := conn.get_reset_query():
        await conn.execute(query)


async def create_pg_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int | None = None,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """The pool every process uses; ``init`` runs on each new connection after the codecs."""

    async def setup(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        if init is not None:
            await init(conn)

    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size or settings.pg_pool_size,
        init=setup,
        reset=_reset,
        connection_class=PgConnection,
        command_timeout=60,
        # a process frozen inside a transaction (a stop, a stall) would hold its row locks, and
        # every other worker behind them, until it runs again: Postgres ends its session instead
        server_settings={"idle_in_transaction_session_timeout": str(settings.pg_idle_in_transaction_ms)},
    )
    assert pool is not None
    return pool
