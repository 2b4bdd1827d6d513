"""Which Redis and Postgres to use: the configured ones when they answer, else embedded.

Only `refstream dev` and the test suite fall back to embedded servers; `serve` and `work`
use what is configured and wait for it.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .embedded import EmbeddedServers

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def answers(url: str, default_port: int, timeout: float = 1.0) -> bool:
    """Something accepts TCP connections where ``url`` points."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout):
            return True
    except OSError:
        return False


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True, slots=True)
class Services:
    redis_url: str
    postgres_url: str  # server-level URL; callers pick the database with with_database()
    embedded_redis: bool
    embedded_postgres: bool


def resolve(stack: ExitStack, *, force_embedded: bool = False, strict: bool = False) -> Services:
    """REDIS_URL / DATABASE_URL if set, else the default local ports; embedded servers for
    whichever does not answer. ``strict`` (CI) refuses to fall back: a configured service
    that is missing fails the run instead of being replaced silently."""
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS
    pg_url = os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES
    need_redis = force_embedded or not answers(redis_url, 6379)
    need_pg = force_embedded or not answers(pg_url, 5432)
    if strict and (need_redis or need_pg) and not force_embedded:
        missing = [n for n, m in (("Redis at " + redis_url, need_redis), ("Postgres at " + pg_url, need_pg)) if m]
        raise RuntimeError(f"not reachable: {', '.join(missing)}")
    if need_redis or need_pg:
        emb = stack.enter_context(EmbeddedServers(redis=need_redis, postgres=need_pg))
        if need_redis:
            assert emb.redis_url is not None
            redis_url = emb.redis_url
        if need_pg:
            assert emb.postgres_url is not None
            pg_url = emb.postgres_url
    return Services(redis_url, pg_url, need_redis, need_pg)
