"""Is the database there, and migrated to the schema version this code needs?

Asked by ``refstream serve`` and ``refstream work`` as they start
(refstream/commands/serve.py) and by ``/readyz`` (through a ``SchemaProbe``, cached
briefly). Every answer is sorted by what happens next:

- ``unreachable`` (nothing listens, the server is starting or shutting down, out of
  connections, a timeout) is an outage, and outages are waited out: the worker waits
  for Postgres at startup as it does mid-run; the edge starts anyway (its public routes
  accept into Redis or the spool) and ``/readyz`` answers 503 until Postgres answers.
- ``database does not exist``, ``authentication failed``, ``not migrated`` / ``schema
  version N, expected M``, or any other refusal, is configuration that no amount of waiting
  fixes: one line naming the server, the database and what to run.

A newer schema than ``SCHEMA_VERSION`` is accepted: schema changes are additive, so a
database migrated by a newer build still serves an older one (rolling upgrades migrate
first, then replace the processes).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import asyncpg
import structlog

from ingest.contract.connections import PG_ERRORS
from ingest.manage.db import SCHEMA_VERSION, schema_version

log = structlog.get_logger("ingest.schema_check")

CONNECT_TIMEOUT_S = 5.0  # a startup check, connect and query: a blackholed host fails in this
CACHE_S = 2.0  # /readyz asks Postgres at most this often
MIGRATE = "run: refstream migrate"


class Kind(StrEnum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    NO_DATABASE = "no_database"
    AUTH_FAILED = "auth_failed"
    NOT_MIGRATED = "not_migrated"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DbStatus:
    kind: Kind
    reason: str = ""  # what is wrong, for a person; one line
    hint: str = ""  # what to do about it
    version: int | None = None  # the recorded schema version, when it could be read
    cause: str = ""  # the exception's type

    @property
    def ok(self) -> bool:
        return self.kind is Kind.OK

    @property
    def transient(self) -> bool:
        """An outage, to be waited out; everything else needs a person."""
        return self.kind is Kind.UNREACHABLE

    def describe(self) -> str:
        """What ``/readyz`` says: ``ok``, or ``error: <reason>; <hint>``."""
        if self.ok:
            return "ok"
        return f"error: {self.reason}; {self.hint}" if self.hint else f"error: {self.reason}"

    def line(self, url: str) -> str:
        """The one line a command that refuses to start prints."""
        return f"postgres at {target(url)}: {self.reason}; {self.hint}"


def target(url: str) -> str:
    """``host:port/database`` of a database URL: never its user or password."""
    parts = urlsplit(url)
    database = parts.path.lstrip("/") or parts.username or "postgres"
    hosts = parts.netloc.rpartition("@")[2]
    if "," in hosts:  # several hosts (a primary and its standbys): each as written
        return f"{hosts}/{database}"
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    return f"[{host}]:{port}/{database}" if ":" in host else f"{host}:{port}/{database}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def classify(exc: BaseException) -> DbStatus:
    """What an exception from connecting to (or querying) Postgres means for the operator.
    By SQLSTATE class, never by message text."""
    cause = type(exc).__name__
    if isinstance(exc, asyncpg.InvalidCatalogNameError):  # 3D000
        return DbStatus(
            Kind.NO_DATABASE, "database does not exist", MIGRATE + " (it creates the database)", cause=cause
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # 28000, 28P01
        return DbStatus(
            Kind.AUTH_FAILED,
            f"authentication failed ({_first_line(exc)})",
            "check the user and password in DATABASE_URL",
            cause=cause,
        )
    if isinstance(exc, (*PG_ERRORS, asyncpg.InterfaceError)):  # 08, 53, 57, closed, timed out
        detail = _first_line(exc)
        return DbStatus(
            Kind.UNREACHABLE,
            f"unreachable ({cause}: {detail})" if detail else f"unreachable ({cause})",
            "is Postgres running, and is DATABASE_URL right?",
            cause=cause,
        )
    if isinstance(exc, asyncpg.PostgresError):
        return DbStatus(
            Kind.FAILED,
            f"refused: {cause} (SQLSTATE {exc.sqlstate}): {_first_line(exc)}",
            "see the Postgres server's log",
            cause=cause,
        )
    return DbStatus(Kind.FAILED, f"{cause}: {_first_line(exc)}", "check DATABASE_URL", cause=cause)


# schema 4 partitions these two; a version recorded over plain tables (a hand-made or
# half-restored database) is refused like a version behind, so nothing runs half-migrated
_PARTITIONED_FROM = 4
_UNPARTITIONED = """
SELECT string_agg(relname, ', ' ORDER BY relname) FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relname IN ('events', 'link_visitor_days') AND relkind <> 'p'
"""


async def _status(conn: asyncpg.Connection) -> DbStatus:
    status = _from_version(version := await schema_version(conn))
    if status.ok and version >= _PARTITIONED_FROM and (plain := await conn.fetchval(_UNPARTITIONED)):
        reason = f"schema version {version}, but {plain} not partitioned (half-migrated)"
        return DbStatus(Kind.NOT_MIGRATED, reason, MIGRATE, version=version)
    return status


def _from_version(version: int) -> DbStatus:
    if version >= SCHEMA_VERSION:
        return DbStatus(Kind.OK, version=version)
    if version == 0:
        reason = f"not migrated (schema version 0, expected {SCHEMA_VERSION})"
    else:
        reason = f"schema version {version}, expected {SCHEMA_VERSION}"
    return DbStatus(Kind.NOT_MIGRATED, reason, MIGRATE, version=version)


async def check_url(url: str, *, within_s: float = CONNECT_TIMEOUT_S) -> DbStatus:
    """Connect to ``url`` on a connection of its own, read the schema version, close; all
    of it ``within_s``."""
    try:
        async with asyncio.timeout(within_s):
            conn = await asyncpg.connect(url, timeout=within_s)
            try:
                return await _status(conn)
            finally:
                await asyncio.shield(conn.close(timeout=within_s))
    except Exception as exc:  # each is classified: the callers print one line, never a trace
        return classify(exc)


async def check_pool(pool: asyncpg.Pool, *, within_s: float) -> DbStatus:
    """The same, on a connection of a running process's pool."""
    try:
        async with asyncio.timeout(within_s):
            async with pool.acquire() as conn:
                return await _status(conn)
    except Exception as exc:
        return classify(exc)


class SchemaProbe:
    """A status asked at most once per ``ttl_s``; concurrent callers share one check, so a
    burst of ``/readyz`` (a load balancer's, every instance's) costs one query."""

    def __init__(
        self,
        check: Callable[[], Awaitable[DbStatus]],
        *,
        ttl_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._clock = clock
        self._status: DbStatus | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def status(self) -> DbStatus:
        if self._status is not None and self._clock() < self._until:
            return self._status
        async with self._lock:
            if self._status is None or self._clock() >= self._until:  # not refreshed while we queued
                self._status = await self._check()
                self._until = self._clock() + self._ttl_s
            return self._status


async def at_startup(
    url: str,
    *,
    wait: bool,
    within_s: float = CONNECT_TIMEOUT_S,
    first_delay: float = 0.25,
    max_delay: float = 5.0,
) -> DbStatus:
    """The database's status as a process starts. ``unreachable`` is logged (a warning
    naming server and database) and, with ``wait``, waited out: retried with a backoff,
    with one log line per change of state (waiting, then ready), never one per try: the
    cause of one failed try may differ from the next (refused, reset, starting up) without
    the state changing. Any other status is returned at once: the caller refuses to start
    on anything but ``ok`` (and, without ``wait``, ``unreachable``)."""
    where = target(url)
    delay = first_delay
    started = time.monotonic()
    last: Kind | None = None
    while True:
        status = await check_url(url, within_s=within_s)
        if not status.transient:
            if status.ok:
                waited = {"waited_s": round(time.monotonic() - started, 1)} if last else {}
                log.info("postgres.ready", postgres=where, schema_version=status.version, **waited)
            return status
        if status.kind is not last:
            last = status.kind
            if wait:
                log.warning("postgres.waiting", postgres=where, reason=status.reason, hint=status.hint)
            else:
                log.warning(
                    "postgres.unreachable",
                    postgres=where,
                    reason=status.reason,
                    note="starting all the same: /readyz answers 503 until Postgres answers",
                )
        if not wait:
            return status
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(max_delay, delay * 2)
