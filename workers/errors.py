"""Errors sorted by what happens next: an outage is waited out, an entry's own failure is not.

- An **outage** is about what sits behind the worker, not about any entry: Postgres or
  Redis unreachable, restarting, out of connections or memory, read-only (a standby after a
  failover), a schema that does not match the code (a bad migration), lock contention that
  outlived the in-place retries. The batch is held in memory and retried with a backoff
  until the cause is gone; it never counts towards dead-lettering.
- Anything else Postgres raises for one batch is about its data: the batch is split to find
  the entry, which goes to the dead-letter stream.

Postgres errors are told apart by SQLSTATE class, never by message text.
"""

from __future__ import annotations

import asyncio

import asyncpg
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisError

# SQLSTATE class (or full code) -> the reason an operator reads in logs, status and metrics
_PG_REASONS: tuple[tuple[str, str], ...] = (
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
)

REASONS = tuple(sorted({r for _, r in _PG_REASONS} | {"redis_unavailable", "redis_oom", "redis_readonly"}))


class Outage(Exception):
    """A batch could not be stored or acked for a reason that is not its own."""

    def __init__(self, reason: str, cause: BaseException) -> None:
        super().__init__(f"{reason}: {type(cause).__name__}: {cause}")
        self.reason = reason
        self.cause = cause

    @property
    def postgres(self) -> bool:
        return self.reason.startswith("postgres_")


def postgres_outage(exc: BaseException) -> str | None:
    """The outage reason for an error raised while talking to Postgres, or None when the
    error is about the data of the batch."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        for prefix, reason in _PG_REASONS:
            if state.startswith(prefix):
                return reason
        return None
    if isinstance(exc, ValueError):
        return None  # asyncpg's client-side DataError is an InterfaceError and a ValueError
    if isinstance(exc, asyncpg.InterfaceError | OSError | asyncio.TimeoutError | ConnectionError):
        return "postgres_unavailable"  # connection closed under us, refused, timed out
    return None


def redis_outage(exc: BaseException) -> str | None:
    """Redis refusing or failing a command is never about an entry: every Redis error is an
    outage (the commands the worker sends are the same for every entry)."""
    if isinstance(exc, OutOfMemoryError):
        return "redis_oom"
    if isinstance(exc, ReadOnlyError):
        return "redis_readonly"  # a replica after a failover
    if isinstance(exc, BusyLoadingError | RedisError | OSError | asyncio.TimeoutError | ConnectionError):
        return "redis_unavailable"
    return None


def is_transient(exc: BaseException) -> bool:
    """Anything either side reports as an outage (used where the caller only retries)."""
    return postgres_outage(exc) is not None or redis_outage(exc) is not None


def is_retryable_in_place(exc: BaseException) -> bool:
    """Deadlock or serialization failure: retry the same transaction at once."""
    return isinstance(exc, asyncpg.exceptions.TransactionRollbackError)
