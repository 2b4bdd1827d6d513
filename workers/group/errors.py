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
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import structlog
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisClusterException, RedisError

from ingest.contract.connections import PG_OUTAGES, client_fault, pg_outage
from ingest.contract.errors import Outage

log = structlog.get_logger("workers.errors")
T = TypeVar("T")

# worker_error: every entry of a batch failed in the worker's own code (a bug, a broken
# deploy): held like an outage rather than dead-lettering every event it meets
REASONS = tuple(
    sorted({r for _, r in PG_OUTAGES} | {"redis_unavailable", "redis_oom", "redis_readonly", "worker_error"})
)


class BatchOutage(Outage):
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
    error is about the data of the batch (SQLSTATE classes: ``ingest.contract.connections.PG_OUTAGES``)."""
    return pg_outage(exc)


def redis_outage(exc: BaseException) -> str | None:
    """Redis refusing or failing a command is never about an entry: every Redis error is an
    outage (the commands the worker sends are the same for every entry)."""
    if isinstance(exc, OutOfMemoryError):
        return "redis_oom"
    if isinstance(exc, ReadOnlyError):
        return "redis_readonly"  # a replica after a failover
    if isinstance(
        exc, BusyLoadingError | RedisError | RedisClusterException | OSError | asyncio.TimeoutError | ConnectionError
    ):
        return "redis_unavailable"
    if client_fault(exc):  # a connection or node redis-py closed under the command
        return "redis_unavailable"
    return None


def is_transient(exc: BaseException) -> bool:
    """Anything either side reports as an outage (used where the caller only retries)."""
    return postgres_outage(exc) is not None or redis_outage(exc) is not None


def is_retryable_in_place(exc: BaseException) -> bool:
    """Deadlock or serialization failure: retry the same transaction at once."""
    return isinstance(exc, asyncpg.exceptions.TransactionRollbackError)


IN_PLACE_RETRIES = 5


async def retried_in_place(
    run: Callable[[], Awaitable[T]], what: str, *, base_s: float = 0.01, tries: int = IN_PLACE_RETRIES
) -> T:
    """``run()``, run again after a short backoff while it fails with a deadlock or a
    serialization failure (``is_retryable_in_place``), ``tries`` times at most; each retry
    logged as ``{what}.retry``. Anything else, and the last failure, is raised."""
    for attempt in range(1, tries + 1):
        try:
            return await run()
        except Exception as exc:
            if not is_retryable_in_place(exc) or attempt == tries:
                raise
            log.warning(f"{what}.retry", attempt=attempt, error=type(exc).__name__)
            await asyncio.sleep(base_s * 2**attempt)
    raise AssertionError("unreachable")
