"""What the worker waits out (an outage) and what it sets aside (the entry's own fault)."""

from __future__ import annotations

import asyncpg
import pytest
from redis import exceptions as r
from redis.asyncio.connection import Connection

from ingest.contract.connections import pg_unavailable
from workers.group.errors import postgres_outage, redis_outage


def _pg(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    return cls("x")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_pg(asyncpg.exceptions.ReadOnlySQLTransactionError), "postgres_read_only"),  # 25006
        (_pg(asyncpg.exceptions.CannotConnectNowError), "postgres_shutdown"),  # 57P03
        (_pg(asyncpg.exceptions.AdminShutdownError), "postgres_shutdown"),  # 57P01
        (_pg(asyncpg.exceptions.TooManyConnectionsError), "postgres_resources"),  # 53300
        (_pg(asyncpg.exceptions.DiskFullError), "postgres_resources"),  # 53100
        (_pg(asyncpg.exceptions.UndefinedTableError), "postgres_schema"),  # 42P01
        (_pg(asyncpg.exceptions.UndefinedColumnError), "postgres_schema"),  # 42703
        (_pg(asyncpg.exceptions.InsufficientPrivilegeError), "postgres_schema"),  # 42501
        (_pg(asyncpg.exceptions.InvalidCatalogNameError), "postgres_schema"),  # 3D000
        (_pg(asyncpg.exceptions.InvalidPasswordError), "postgres_auth"),  # 28P01
        (_pg(asyncpg.exceptions.DeadlockDetectedError), "postgres_contention"),  # 40P01
        (_pg(asyncpg.exceptions.LockNotAvailableError), "postgres_contention"),  # 55P03
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), "postgres_unavailable"),
        (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            "postgres_unavailable",
        ),
        (ConnectionRefusedError(111, "refused"), "postgres_unavailable"),
        (TimeoutError(), "postgres_unavailable"),
        # the entry's own data: set aside, never waited for
        (_pg(asyncpg.exceptions.NotNullViolationError), None),  # 23502
        (_pg(asyncpg.exceptions.UniqueViolationError), None),  # 23505
        (_pg(asyncpg.exceptions.InvalidTextRepresentationError), None),  # 22P02
        (_pg(asyncpg.exceptions.CharacterNotInRepertoireError), None),  # 22021: a NUL byte
        (asyncpg.exceptions.DataError("invalid input for query argument"), None),  # client-side, a ValueError
        (ValueError("bad"), None),
    ],
)
def test_postgres_errors_by_sqlstate_class(exc: BaseException, reason: str | None) -> None:
    assert postgres_outage(exc) == reason
    # every route's wrapper agrees: an outage is 503 "try again", the data's fault is not
    assert pg_unavailable(exc) == (reason is not None)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (r.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."), "redis_oom"),
        (r.ReadOnlyError("You can't write against a read only replica."), "redis_readonly"),
        (r.BusyLoadingError("Redis is loading the dataset in memory"), "redis_unavailable"),
        (r.ConnectionError("Connection refused"), "redis_unavailable"),
        (r.TimeoutError("Timeout reading from socket"), "redis_unavailable"),
        (r.ResponseError("MASTERDOWN Link with MASTER is down"), "redis_unavailable"),
        (r.SlotNotCoveredError("All slots are not covered"), "redis_unavailable"),  # a cluster failover
        (r.RedisClusterException("Redis Cluster cannot be connected"), "redis_unavailable"),
        # a connection the cluster client closed under a command writing to it (a primary SIGKILLed)
        (RuntimeError("a bug of our own"), None),
        (KeyError("x"), None),
    ],
)
def test_every_redis_refusal_is_an_outage(exc: BaseException, reason: str | None) -> None:
    assert redis_outage(exc) == reason


async def test_the_gate_reopens_when_no_partition_waits_for_postgres_any_more() -> None:
    from workers.group.gate import Gate

    gate = Gate()
    gate.block(0, "postgres_unavailable")
    gate.block(1, "redis_oom")
    assert gate.closed and gate.reasons == ["postgres_unavailable", "redis_oom"]
    # partition 0's batch committed, and its dead-letter XADD now meets the full Redis:
    # Postgres holds nobody, so every partition reads (and acks, which frees Redis)
    gate.block(0, "redis_oom")
    assert not gate.closed and gate.blocked and gate.reasons == ["redis_oom"]
    gate.clear(0)
    gate.clear(1)
    assert not gate.closed and not gate.blocked


async def test_a_partition_constraint_is_contention_and_a_named_check_the_entry(pg: asyncpg.Pool) -> None:
    # Postgres raises a partition constraint violation for a row routed by a partition map
    # that a concurrent ATTACH PARTITION changed; here it is provoked directly (a row put in
    # a partition it does not fit), beside a CHECK of the row's own
    async with pg.acquire() as conn:
        await conn.execute(
            "CREATE TEMP TABLE part_t (d int, CONSTRAINT d_small CHECK (d < 1000)) PARTITION BY RANGE (d);"
            "CREATE TEMP TABLE part_t_1 PARTITION OF part_t FOR VALUES FROM (0) TO (10);"
            "CREATE TEMP TABLE part_t_default PARTITION OF part_t DEFAULT;"
        )
        with pytest.raises(asyncpg.CheckViolationError) as partition:
            await conn.execute("INSERT INTO part_t_1 VALUES (50)")
        with pytest.raises(asyncpg.CheckViolationError) as named:
            await conn.execute("INSERT INTO part_t VALUES (5000)")
    assert postgres_outage(partition.value) == "postgres_contention"
    assert postgres_outage(named.value) is None  # the entry's own data: set aside


async def test_a_connection_closed_under_a_command_is_an_outage_and_our_own_errors_are_not() -> None:
    """A primary failing over: redis-py closes every node's connections at once, and a
    command already using one finds no writer (AttributeError) or a closed transport
    (RuntimeError), raised inside redis-py's connection code: an outage, not a crash."""
    conn = Connection(host="127.0.0.1", port=1)
    conn._writer = None  # as redis-py's disconnect leaves it, under a command still writing
    with pytest.raises(AttributeError) as caught:
        await conn._send_packed_command([b"PING"])
    assert redis_outage(caught.value) == "redis_unavailable"
    ours = AttributeError("'NoneType' object has no attribute 'writelines'")  # the same words, not redis-py's
    assert redis_outage(ours) is None
    assert redis_outage(RuntimeError("unable to perform operation on <TCPTransport closed=True>")) is None
