"""Which Redis and Postgres to use: the configured ones when they answer, else embedded.

Only `refstream dev` and the test suite fall back to embedded servers; `serve` and `work`
use what is configured and wait for it.

"Answers" means a real session: a Postgres connection (``ingest.manage.schema_check`` sorts what
the server says) and a Redis PING, not an open port. A server that listens but refuses us
is no server to use: on the default address (a stock Postgres with a password on 5432, a
Redis with ``requirepass``) it is replaced by an embedded one, with a one-line note saying
so; at a configured address (``REDIS_URL``, ``DATABASE_URL``) it is a mistake to fix,
named in one line, never replaced in silence.

Also what the command line says about them: one line for an error from either, naming
the server by ``host:port/db`` (never a password) and what to do (``explain``), and a
one-shot command's bounded wait for one (``wait_for_redis``, ``wait_for_postgres``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Coroutine
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
import structlog
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from ingest.contract.connections import connect_redis
from ingest.contract.errors import Misconfigured
from ingest.contract.sentinel_url import sentinel_target
from ingest.contract.settings import Settings
from ingest.manage import schema_check

from .embedded import EmbeddedServers

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
CHECK_TIMEOUT_S = 2.0

log = structlog.get_logger("refstream.services")

T = TypeVar("T")


class ServiceError(Misconfigured, RuntimeError):
    """A configured service that cannot be used; the message is the one line to print."""


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


# -- what a Redis says about itself ------------------------------------------------------


def redis_target(url: str) -> str:
    """``host:port/db`` of a Redis URL: never its user or password."""
    try:
        target = sentinel_target(url)
    except ValueError:
        target = None
    if target is not None:
        return target.where
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    db = parts.path.lstrip("/") or "0"
    return f"[{host}]:{port}/{db}" if ":" in host else f"{host}:{port}/{db}"


@dataclass(frozen=True, slots=True)
class RedisProblem:
    transient: bool  # an outage (nothing listens, a timeout): waiting may fix it
    reason: str
    hint: str

    def line(self, url: str) -> str:
        return f"redis at {redis_target(url)}: {self.reason}; {self.hint}"


def _said(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def redis_problem(exc: BaseException) -> RedisProblem:
    """What an error from connecting to (or asking) Redis means for the operator."""
    said = _said(exc)
    if isinstance(exc, AuthenticationError):  # before ConnectionError: it is one
        return RedisProblem(False, f"authentication failed ({said})", "check the user and password in REDIS_URL")
    if isinstance(exc, ResponseError) and "DB index" in said:
        return RedisProblem(
            False, f"refused ({said})", "check the database number in REDIS_URL (16 by default: 0 to 15)"
        )
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)):
        return RedisProblem(True, f"unreachable ({said})", "is Redis running, and is REDIS_URL right?")
    if isinstance(exc, RedisClusterException):
        return RedisProblem(False, f"refused ({said})", "check REDIS_URL and REFSTREAM_REDIS_CLUSTER")
    return RedisProblem(False, f"refused ({type(exc).__name__}: {said})", "see the Redis server's log")


def check_redis(url: str, timeout: float = CHECK_TIMEOUT_S) -> RedisProblem | None:
    """None when Redis at ``url`` answers PING (its database selected, credentials taken)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        return None
    except (RedisError, OSError) as exc:
        return redis_problem(exc)
    finally:
        client.close()


def check_postgres(url: str, timeout: float = CHECK_TIMEOUT_S) -> schema_check.DbStatus:
    """The server's answer to a session at ``url``. ``no_database`` and ``not_migrated`` are
    answers too: the server takes our credentials, and ``migrate`` does the rest."""
    return _sync(schema_check.check_url(url, within_s=timeout))


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    # a loop of its own on a thread of its own: callable from inside a running loop too
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# -- one line for an error a command met ------------------------------------------------


def _raised_in(exc: BaseException, package: str) -> bool:
    """Did ``exc`` come up through ``package``'s code? asyncpg lets the socket's own
    errors (refused, reset, timed out) through as they are."""
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(package + "."):
            return True
        tb = tb.tb_next
    return False


def postgres_line(exc: BaseException, url: str) -> str:
    """``ingest.manage.schema_check``'s line for an error from Postgres; a query that a missing or
    older schema refused is called what it is, with what to run."""
    status = schema_check.classify(exc)
    if status.kind is schema_check.Kind.FAILED and isinstance(exc, asyncpg.PostgresError):
        checked = _sync(schema_check.check_url(url))
        if not checked.ok:
            status = checked
    return status.line(url)


def explain(exc: BaseException, *, redis_url: str, database_url: str) -> str | None:
    """The one line for an error from Redis or Postgres, naming the server (never its
    password) and what to do; None for anything else."""
    if isinstance(exc, RedisError | RedisClusterException):
        return redis_problem(exc).line(redis_url)
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return _said(exc)  # asyncpg's own DataError: an argument it cannot send (not a UUID, say)
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError) or (
        isinstance(exc, OSError | TimeoutError) and _raised_in(exc, "asyncpg")
    ):
        return postgres_line(exc, database_url)
    return None


# -- a one-shot command's wait ----------------------------------------------------------


def _gave_up(settings: Settings) -> str:
    return f" (gave up after {settings.connect_timeout_s:g} s: REFSTREAM_CONNECT_TIMEOUT_S)"


async def wait_for_postgres(settings: Settings) -> None:
    """As ``work`` waits for Postgres (``schema_check.at_startup``: one log line naming
    what it waits for), but at most ``connect_timeout_s``; then, or at once for a database
    that answers but is missing, refused or behind, ``ServiceError`` with the line."""
    url = settings.database_url
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            status = await schema_check.at_startup(url, wait=True)
    except TimeoutError:
        status = await schema_check.check_url(url)  # what it still says, for the line
        if status.transient:
            raise ServiceError(status.line(url) + _gave_up(settings)) from None
    if not status.ok:
        raise ServiceError(status.line(url))


async def wait_for_redis(settings: Settings) -> None:
    """PING until Redis answers, at most ``connect_timeout_s``, with one log line saying
    what it waits for. A Redis that answers but refuses us (credentials, a database number
    past its ``databases``) fails at once: ``ServiceError`` with the line."""
    redis = connect_redis(settings)
    where = redis_target(settings.redis_url)
    deadline = time.monotonic() + settings.connect_timeout_s
    delay, waiting = 0.25, False
    try:
        while True:
            try:
                await redis.ping()
            except (RedisError, RedisClusterException, OSError) as exc:
                problem = redis_problem(exc)
                if not problem.transient:
                    raise ServiceError(problem.line(settings.redis_url)) from exc
                if time.monotonic() + delay > deadline:
                    raise ServiceError(problem.line(settings.redis_url) + _gave_up(settings)) from exc
                if not waiting:
                    waiting = True
                    log.warning("redis.waiting", redis=where, reason=problem.reason, up_to_s=settings.connect_timeout_s)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            else:
                if waiting:
                    log.info("redis.ready", redis=where)
                return
    finally:
        await redis.aclose()


# -- the choice ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Services:
    redis_url: str
    postgres_url: str  # server-level URL; callers pick the database with with_database()
    embedded_redis: bool
    embedded_postgres: bool
    notes: tuple[str, ...] = field(default=())  # why a server was replaced, one line each


def _redis_refusal(url: str, configured: bool) -> str | None:
    """None when Redis at ``url`` is usable; "" when nothing answers; else why it refuses us."""
    problem = check_redis(url)
    if problem is None:
        return None
    if problem.transient:
        return ""
    if configured:
        raise ServiceError(problem.line(url))
    return f"redis at {redis_target(url)} refuses us ({problem.reason})"


def _postgres_refusal(url: str, configured: bool) -> str | None:
    status = check_postgres(url)
    if status.ok or status.kind in (schema_check.Kind.NO_DATABASE, schema_check.Kind.NOT_MIGRATED):
        return None
    if status.transient:
        return ""
    if configured:
        raise ServiceError(status.line(url))
    return f"postgres at {schema_check.target(url)} refuses the default credentials ({status.reason})"


def resolve(
    stack: ExitStack,
    *,
    force_embedded: bool = False,
    strict: bool = False,
    default_redis: str = DEFAULT_REDIS,
    default_postgres: str = DEFAULT_POSTGRES,
    data_dir: str | None = None,
) -> Services:
    """REDIS_URL / DATABASE_URL if set, else the default local ports; embedded servers for
    whichever does not answer, or (at a default address only) refuses us. ``strict`` (CI)
    refuses to fall back: a service that is missing or refuses us fails the run instead of
    being replaced silently. ``data_dir``: the embedded servers keep their data there,
    across runs (else in a temporary directory, deleted on exit)."""
    redis_url = os.environ.get("REDIS_URL") or default_redis
    pg_url = os.environ.get("DATABASE_URL") or default_postgres
    redis_no = None if force_embedded else _redis_refusal(redis_url, bool(os.environ.get("REDIS_URL")))
    pg_no = None if force_embedded else _postgres_refusal(pg_url, bool(os.environ.get("DATABASE_URL")))
    need_redis = force_embedded or redis_no is not None
    need_pg = force_embedded or pg_no is not None
    if strict and not force_embedded and (need_redis or need_pg):
        missing = [
            refused or f"{name} at {where}: not reachable"
            for name, where, refused in (
                ("redis", redis_target(redis_url), redis_no),
                ("postgres", schema_check.target(pg_url), pg_no),
            )
            if refused is not None
        ]
        raise ServiceError("; ".join(missing))
    notes = tuple(
        f"{refused}: using an embedded {name} instead; set {var} to use that server"
        for name, var, refused in (("Redis", "REDIS_URL", redis_no), ("Postgres", "DATABASE_URL", pg_no))
        if refused
    )
    if need_redis or need_pg:
        emb = stack.enter_context(EmbeddedServers(redis=need_redis, postgres=need_pg, data_dir=data_dir))
        if need_redis:
            assert emb.redis_url is not None
            redis_url = emb.redis_url
        if need_pg:
            assert emb.postgres_url is not None
            pg_url = emb.postgres_url
    return Services(redis_url, pg_url, need_redis, need_pg, notes)
