"""The settings of the connections (Redis, Postgres, the acknowledgement's durability) and
of the streams (the key prefix, the partitions)."""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings

from .base import CONFIG, renamed

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


class ConnectionSettings(BaseSettings):
    model_config = CONFIG

    # connections ---------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis holding the event streams, caches and rate limits.",
    )
    redis_cluster: bool = Field(False, description="Treat REDIS_URL as a Redis Cluster seed node.")
    arq_redis_url: str | None = Field(
        None,
        description="Plain Redis for arq's own job queue (arq has no cluster support); defaults to REDIS_URL.",
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/refstream",
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
    )
    redis_socket_timeout_s: float = Field(
        5.0,
        gt=0,
        validation_alias=renamed("redis_socket_timeout_s", "REFSTREAM_REDIS_SOCKET_TIMEOUT"),
        description="Seconds before a Redis call fails.",
    )
    redis_deadline_ms: int = Field(
        1000,
        ge=50,
        le=60_000,
        description="Edge: the longest a request waits on Redis (queue, connect and round trip); then public"
        " routes spool and keyed routes answer 503.",
    )
    redis_max_queued: int = Field(
        20_000, ge=1, description="Edge: Redis commands queued at most; past it requests fail fast (spool or 503)."
    )
    ack_durability: str = Field(
        "primary",
        description="When a 2xx is answered: primary (XADD acknowledged by the primary), replicas:N (and by"
        " N replicas: WAIT), fsync (and written to the primary's AOF: WAITAOF, Redis >= 7.2).",
    )
    ack_wait_ms: int = Field(
        500, ge=1, le=60_000, description="replicas:N and fsync: how long a round trip waits for the acknowledgement."
    )
    connect_timeout_s: float = Field(
        30.0, gt=0, description="One-shot commands (work --drain, dev): how long to wait for Redis or Postgres."
    )
    pg_pool_size: int = Field(4, ge=1, le=100)
    pg_idle_in_transaction_ms: int = Field(
        10_000, ge=0, description="Postgres ends a session of ours idle this long inside a transaction (0: never)."
    )

    @field_validator("redis_url", "arq_redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        # redis-py's own refusal names no setting; the URL itself is never echoed (a password)
        if v is not None and v.partition("://")[0].lower() not in _REDIS_SCHEMES:
            raise ValueError("a URL such as redis://host:6379/0 (redis://, rediss://, unix:// or redis+sentinel://)")
        return v

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, v: str) -> str:
        if v.partition("://")[0].lower() not in ("postgresql", "postgres"):
            raise ValueError("a URL such as postgresql://user@host:5432/refstream (postgresql:// or postgres://)")
        return v

    @field_validator("ack_durability")
    @classmethod
    def _known_durability(cls, v: str) -> str:
        parse_durability(v)
        return v.strip().lower()

    @property
    def ack_replicas(self) -> int:
        """N of ``replicas:N``; 0 otherwise."""
        return parse_durability(self.ack_durability)[0]

    @property
    def ack_fsync(self) -> bool:
        return parse_durability(self.ack_durability)[1]

    @property
    def arq_url(self) -> str:
        return self.arq_redis_url or self.redis_url


class StreamSettings(BaseSettings):
    model_config = CONFIG

    # streams -------------------------------------------------------------------------
    stream_prefix: str = Field("refstream", description="Prefix of every Redis key refstream owns.")
    partitions: int = Field(4, ge=1, le=1024, description="Number of event stream partitions.")

    @field_validator("stream_prefix")
    @classmethod
    def _prefix_is_plain(cls, v: str) -> str:
        # braces would change the cluster hash tag of every key
        if not _PREFIX_RE.match(v):
            raise ValueError("1-64 of A-Z a-z 0-9 _ . : - (no braces)")
        return v


def parse_durability(level: str) -> tuple[int, bool]:
    """``primary`` → (0, False); ``replicas:N`` → (N, False); ``fsync`` → (0, True)."""
    v = level.strip().lower()
    if v == "primary":
        return 0, False
    if v == "fsync":
        return 0, True
    name, _, n = v.partition(":")
    if name == "replicas" and n.isdigit() and 1 <= int(n) <= 16:
        return int(n), False
    raise ValueError("one of primary, replicas:N (N from 1 to 16), fsync")
