"""Errors sorted by what happens next.

- transient: the batch stays pending and is retried after a backoff (Redis or Postgres
  unreachable, restarting, out of connections; deadlocks and serialization failures);
- anything else raised by Postgres for one batch is about its data: the batch is split to
  find the entry, which goes to the dead-letter stream.
Postgres errors are told apart by SQLSTATE class (asyncpg's exception classes), never by text.
"""

from __future__ import annotations

import asyncio

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# SQLSTATE classes 08 (connection), 40 (rollback: deadlock, serialization), 53 (resources),
# 57 (operator intervention: shutdown, cannot connect now), 58 (system error)
_PG_TRANSIENT = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.InterfaceError,  # connection closed under us
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ValueError):
        return False  # asyncpg's client-side DataError is an InterfaceError and a ValueError
    return isinstance(
        exc,
        (*_PG_TRANSIENT, RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError, ConnectionError),
    )


def is_retryable_in_place(exc: BaseException) -> bool:
    """Deadlock or serialization failure: retry the same transaction at once."""
    return isinstance(exc, asyncpg.exceptions.TransactionRollbackError)
