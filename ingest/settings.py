"""The one settings object.

Built once at the entrypoint (``Settings()`` reads the environment there, never at import
time) and passed down to the edge, the worker and the CLI.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFSTREAM_", extra="ignore", frozen=True)

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
    redis_socket_timeout: float = Field(5.0, gt=0, description="Seconds before a Redis call fails.")
    connect_timeout_s: float = Field(
        30.0, gt=0, description="One-shot commands (work --drain, dev): how long to wait for Redis or Postgres."
    )
    pg_pool_size: int = Field(4, ge=1, le=100)

    # streams -------------------------------------------------------------------------
    stream_prefix: str = Field("refstream", description="Prefix of every Redis key refstream owns.")
    partitions: int = Field(4, ge=1, le=1024, description="Number of event stream partitions.")

    # edge ----------------------------------------------------------------------------
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    batch_max_bytes: int = Field(1 << 20, ge=1024, description="Body cap of the batch endpoint (after gzip).")
    max_string_length: int = Field(2048, ge=64)
    click_rate_limit: int = Field(60, ge=1, description="seed 000 route: requests/minute per IP")
    public_rate_limit: int = Field(600, ge=1, description="other public routes: requests/minute per IP")
    key_rate_limit: int = Field(600, ge=1, description="authenticated routes: requests/minute per API key")
    key_cache_s: float = Field(5.0, ge=0, description="in-process API key cache: revocations land within this")
    trusted_proxies: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-For is believed; empty: the peer address is the client.",
    )
    pipeline_max_commands: int = Field(2048, ge=1, description="Commands per Redis round trip.")
    fallback_url: str = Field("/", description="Where /r/{code} sends an unknown or inactive code.")
    click_id_param: str = Field("refstream_click_id", description="Query parameter /r/{code} appends.")
    cookie_name: str = Field("refstream_click", description="The click-id cookie /r/{code} sets.")
    cookie_domain: str | None = Field(None, description="Domain attribute of that cookie (e.g. .yoursite.com).")
    spool_dir: str = Field(".refstream-spool", description="Where public routes spool events while Redis is down.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Spool cap; beyond it public routes answer 503.")
    spool_drain_every_s: float = Field(1.0, gt=0)

    # worker --------------------------------------------------------------------------
    batch_size: int = Field(500, ge=1, le=10_000)
    block_ms: int = Field(1000, ge=10, description="XREADGROUP block time.")
    claim_idle_ms: int = Field(60_000, ge=100, description="Reclaim entries idle this long.")
    reclaim_every_s: int = Field(15, ge=1, le=60)
    max_deliveries: int = Field(
        5,
        ge=1,
        description="An entry that a worker stopped while processing (a crash) this many times is dead-lettered;"
        " outages never count.",
    )
    retention_s: int = Field(7 * 86400, ge=0, description="Acked entries stay this long (for replays).")
    trim_every_s: int = Field(60, ge=1, le=3600)
    drops_fold_every_s: int = Field(
        5, ge=1, le=60, description="Worker: fold the edges' refusal tallies (drops) into Postgres this often."
    )
    consumer_name: str | None = Field(None, description="Defaults to hostname-pid.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Worker: serve /metrics on this port.")
    metrics_host: str = Field("127.0.0.1", description="Worker: the address /metrics listens on.")
    city_db: str | None = Field(None, description="A MaxMind City .mmdb for city-level geo (optional).")
    secret_key: str | None = Field(
        None, description="Fernet key(s), comma-separated, encrypting webhook signing secrets at rest."
    )

    # logging -------------------------------------------------------------------------
    log_level: str = "info"
    log_json: bool = True
    log_flush_ms: int = Field(
        200, ge=0, le=10_000,
        description="serve/work: write log lines in batches this often (0: every line at once).",
    )  # fmt: skip

    # fault injection, for the redelivery tests only: "crash_after_commit" makes the worker
    # SIGKILL itself after its first COMMIT and before the XACK; "crash_on:CODE" before the
    # COMMIT of any batch holding an event for link CODE (a poison entry that kills workers).
    fault: str | None = None

    @field_validator("stream_prefix")
    @classmethod
    def _prefix_is_plain(cls, v: str) -> str:
        # braces would change the cluster hash tag of every key
        if not _PREFIX_RE.match(v):
            raise ValueError("1-64 of A-Z a-z 0-9 _ . : - (no braces)")
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_cidrs(cls, v: object) -> object:
        if isinstance(v, str):
            return [ip_network(p.strip(), strict=False) for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _block_below_socket_timeout(self) -> Settings:
        # a blocking XREADGROUP longer than the socket timeout would look like a dead socket
        if self.block_ms >= self.redis_socket_timeout * 1000:
            raise ValueError(
                "block_ms must stay below redis_socket_timeout (REFSTREAM_BLOCK_MS="
                f"{self.block_ms}, REFSTREAM_REDIS_SOCKET_TIMEOUT={self.redis_socket_timeout:g})"
            )
        return self

    @property
    def arq_url(self) -> str:
        return self.arq_redis_url or self.redis_url


_SECRET = frozenset({"redis_url", "arq_redis_url", "database_url", "secret_key"})  # never echoed


def env_var(field: str) -> str:
    """The environment variable that sets ``field``: ``REFSTREAM_<FIELD>``, or its alias."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    if field.isupper():  # already an alias (pydantic reports the name the value came under)
        return field
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def explain(exc: ValidationError) -> str:
    """A settings error in one line, each problem under the environment variable to fix:
    ``REFSTREAM_PARTITIONS: input should be a valid integer, ... (got 'abc')``."""
    problems = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        msg = msg[:1].lower() + msg[1:]
        given = err.get("input")
        if field and isinstance(given, str | int | float) and field.lower() not in _SECRET:
            msg += f" (got {str(given)[:60]!r})"
        problems.append(f"{env_var(field)}: {msg}" if field else msg)
    return "; ".join(problems).replace("\n", " ")
