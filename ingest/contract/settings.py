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

from ingest.contract import clock
from ingest.contract.logs import AccessLog
from ingest.contract.sentinel_url import sentinel_target

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhd])?$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> int:
    """A duration as settings and commands take it: 3600, 90s, 30m, 1h, 2d."""
    if not (m := _DURATION_RE.match(text.strip().lower())):
        raise ValueError("seconds, or a number with s, m, h or d: 3600, 90s, 30m, 1h, 2d")
    return int(m[1]) * _DURATION_UNITS[m[2] or "s"]


_SIZE_RE = re.compile(r"^(\d+)\s*(b|kb|mb|gb|k|m|g)?$")
_SIZE_SHIFT = {"b": 0, "kb": 10, "k": 10, "mb": 20, "m": 20, "gb": 30, "g": 30}
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


def _renamed(field: str, *former: str) -> AliasChoices:
    """The environment names of a setting whose name changed (issue 38 put the unit in
    every name): ``REFSTREAM_<FIELD>`` first, so it wins where both are given; then the
    former names, still read; then the field's own name, for ``Settings(field=...)``.
    docs/configuration.md lists each former name beside its new one."""
    return AliasChoices(f"REFSTREAM_{field.upper()}", *former, field)


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
    redis_socket_timeout_s: float = Field(
        5.0,
        gt=0,
        validation_alias=_renamed("redis_socket_timeout_s", "REFSTREAM_REDIS_SOCKET_TIMEOUT"),
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

    # streams -------------------------------------------------------------------------
    stream_prefix: str = Field("refstream", description="Prefix of every Redis key refstream owns.")
    partitions: int = Field(4, ge=1, le=1024, description="Number of event stream partitions.")

    # edge ----------------------------------------------------------------------------
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    batch_max_bytes: int = Field(1 << 20, ge=1024, description="Body cap of the batch endpoint (after gzip).")
    max_string_length: int = Field(2048, ge=64)
    click_rate_limit_per_min: int = Field(
        60,
        ge=1,
        validation_alias=_renamed("click_rate_limit_per_min", "REFSTREAM_CLICK_RATE_LIMIT"),
        description="seed 000 route: requests/minute per IP",
    )
    public_rate_limit_per_min: int = Field(
        600,
        ge=1,
        validation_alias=_renamed("public_rate_limit_per_min", "REFSTREAM_PUBLIC_RATE_LIMIT"),
        description="other public routes: requests/minute per IP",
    )
    key_rate_limit_per_min: int = Field(
        600,
        ge=1,
        validation_alias=_renamed("key_rate_limit_per_min", "REFSTREAM_KEY_RATE_LIMIT"),
        description="authenticated routes: requests/minute per API key",
    )
    track_click_rate_limit_per_min: int = Field(
        120, ge=1, description="Dub's POST /track/click (browsers): requests/minute per IP"
    )
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
    idempotency_window_s: int = Field(
        86400, ge=1, le=30 * 86400, description="How long an idempotency key's first answer is kept for repeats."
    )
    click_pending_s: int = Field(
        3 * 86400,
        ge=0,
        description="A lead naming an unknown click id minted this recently answers 503 (retry): the click may"
        " still wait in a spool or a stream. Older or malformed ids answer 400.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A new connection's request headers must be complete within this; else it is closed."
    )
    body_timeout_s: float = Field(10.0, gt=0, description="A request body must arrive in full within this (408).")
    keepalive_timeout_s: float = Field(
        75.0, gt=0, description="An idle keep-alive connection is closed after this (longer than a balancer's 60 s)."
    )
    max_header_bytes: int = Field(
        8190, ge=1024, le=65536, description="Longest request line and header field (aiohttp's limits; 431 past it)."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs on loopback, private, link-local ... addresses (on-premises receivers)."
    )

    # worker --------------------------------------------------------------------------
    batch_size: int = Field(500, ge=1, le=10_000)
    block_ms: int = Field(1000, ge=10, description="XREADGROUP block time.")
    linger_ms: float = Field(
        4.0,
        ge=0,
        le=1000,
        description="Worker: a read of a partition that returned a short batch waits this long once for more to"
        " join it while its Postgres writes nothing, and a small batch that finds the worker's Postgres idle"
        " waits as long at most for the other partitions' to share its transaction (a full read never waits;"
        " 0: never): fewer, larger transactions under a trickle, at this much latency twice.",
    )
    read_interval_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="Worker: under a steady load its partitions are read together on a tick this long (after a read"
        " that found nothing or a full batch, at once): fewer, larger transactions, at up to this much latency"
        " (0: a partition is read again as soon as its batch is stored).",
    )
    claim_idle_ms: int = Field(60_000, ge=100, description="Reclaim entries idle this long.")
    reclaim_every_s: int = Field(15, ge=1, le=60)
    drain_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Worker, archiver: on SIGTERM the batches in flight get this long to commit and ack; what is"
        " still held then is handed back (left pending, marked idle: any worker takes it at once) and the process"
        " exits. Give the deployment a grace period about 10 s beyond it.",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description="An entry that a worker stopped while processing (a crash) this many times is dead-lettered;"
        " outages never count.",
    )
    stream_retention_s: int = Field(
        3600,
        ge=0,
        validation_alias=_renamed("stream_retention_s", "REFSTREAM_STREAM_RETENTION", "REFSTREAM_RETENTION_S"),
        description="Seconds (or 90s, 30m, 1h, 2d) acked entries stay in the streams; older ones are read from the"
        " archive. REFSTREAM_STREAM_RETENTION and REFSTREAM_RETENTION_S are its former names.",
    )
    stream_max_bytes: int = Field(
        256 << 20,
        ge=0,
        description="Memory budget of all event partitions together (bytes, or 512kb, 64mb, 1gb; 0: none): past it"
        " acked entries are trimmed before their retention ends.",
    )
    memory_warn_ratio: float = Field(
        0.8, gt=0, le=1, description="status and the worker warn when Redis used_memory passes this share of maxmemory."
    )
    trim_every_s: int = Field(60, ge=1, le=3600)
    drops_fold_every_s: int = Field(
        5, ge=1, le=60, description="Worker: fold the edges' refusal tallies (drops) into Postgres this often."
    )
    event_retention_days: int = Field(
        90,
        ge=2,
        le=36500,
        validation_alias=_renamed("event_retention_days", "REFSTREAM_EVENT_RETENTION"),
        description="Days of event rows Postgres keeps (daily partitions; daily stats stay).",
    )
    dedupe_retention_days: int = Field(
        400,
        ge=2,
        le=36500,
        validation_alias=_renamed("dedupe_retention_days", "REFSTREAM_DEDUPE_RETENTION"),
        description="Days a lead's or conversion's dedupe key is kept (>= event_retention_days).",
    )
    partition_every_s: int = Field(600, ge=10, le=86400, description="Worker: partition maintenance period.")
    webhook_retention_days: int = Field(
        30,
        ge=1,
        le=36500,
        validation_alias=_renamed("webhook_retention_days", "REFSTREAM_WEBHOOK_RETENTION"),
        description="Days a delivered or failed webhook delivery (and its attempts) is kept.",
    )
    consumer_name: str | None = Field(None, description="Defaults to hostname-pid.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Worker: serve /metrics on this port.")
    metrics_host: str = Field("127.0.0.1", description="Worker: the address /metrics listens on.")
    city_db: str | None = Field(None, description="A MaxMind City .mmdb for city-level geo (optional).")
    secret_key: str | None = Field(
        None, description="Fernet key(s), comma-separated, encrypting webhook signing secrets at rest."
    )
    console_token: str | None = Field(
        None,
        min_length=16,
        description="The operator's token for refstream console (a Bearer header); needed off loopback.",
    )

    # clock ---------------------------------------------------------------------------
    clock_skew_max_s: float = Field(
        clock.SKEW_MAX_S,
        gt=0,
        description="A process whose clock differs from Redis's or Postgres's by more than this logs it, reads"
        " Redis's time instead (edge, worker) and does no destructive maintenance (partition drops, retention,"
        " trims by time) until they agree again.",
    )
    clock_offset_s: float = Field(
        0.0,
        description="For fault tests only: shifts this process's wall clock by this many seconds, as a host"
        " whose clock is wrong would be. Never set it in production.",
    )

    # archive -------------------------------------------------------------------------
    archive_url: str = Field(
        "file://.refstream-archive",
        description="Where `refstream archive` writes segments: a directory (file://path or a path) or s3://bucket/prefix.",
    )
    archive_s3_endpoint: str | None = Field(
        None, description="An S3-compatible endpoint (MinIO, R2, ...); default: AWS. Credentials: AWS_* variables."
    )
    archive_s3_region: str = Field("us-east-1", description="The bucket's region.")
    archive_segment_entries: int = Field(20_000, ge=1, description="A segment is sealed at this many entries...")
    archive_segment_s: float = Field(
        30.0,
        gt=0,
        description="... or once its first entry was read this long ago (below REFSTREAM_CLAIM_IDLE_MS: see"
        " archive_conflict).",
    )

    # erasure -------------------------------------------------------------------------
    erase_archive_days: int = Field(
        30,
        ge=1,
        le=365,
        description="An erasure's archive segments are rewritten within this many days (its stated deadline;"
        " `refstream erase --status` flags one overdue).",
    )
    erase_sweep_every_s: int = Field(
        10,
        ge=1,
        le=3600,
        description="How often the workers finish pending erasures in Redis and the archive.",
    )

    suppression_refresh_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often each edge reads the do-not-track lists' changes: a visitor, customer or address"
        " listed is suppressed within this long.",
    )
    suppression_max: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="The most entries one workspace's do-not-track list holds: POST /v1/suppressions past it"
        " answers 409 limit_reached.",
    )

    # logging -------------------------------------------------------------------------
    log_level: str = "info"
    log_json: bool = True
    log_flush_ms: int = Field(
        200,
        ge=0,
        le=10_000,
        description="serve/work: write log lines in batches this often (0: every line at once).",
    )
    access_log: str = Field(
        "sample:0.01",
        description="Edge: which requests get an access line: errors (every 4xx/5xx), sample:<ratio> (those, and"
        " that fraction of the rest) or all. Metrics count every request.",
    )

    @field_validator("stream_prefix")
    @classmethod
    def _prefix_is_plain(cls, v: str) -> str:
        # braces would change the cluster hash tag of every key
        if not _PREFIX_RE.match(v):
            raise ValueError("1-64 of A-Z a-z 0-9 _ . : - (no braces)")
        return v

    @field_validator("console_token", mode="before")
    @classmethod
    def _no_token(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # compose's empty default: none

    @field_validator("access_log")
    @classmethod
    def _access_log(cls, v: str) -> str:
        AccessLog.parse(v)  # fail fast, at startup
        return v

    @field_validator("stream_retention_s", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        if isinstance(v, str):
            return seconds(v)
        return v

    @field_validator("stream_max_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        if isinstance(v, str):
            if not (m := _SIZE_RE.match(v.strip().lower())):
                raise ValueError("bytes, or a number with kb, mb or gb: 268435456, 512kb, 64mb, 1gb (0: no budget)")
            return int(m[1]) << _SIZE_SHIFT[m[2] or "b"]
        return v

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

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, v: str) -> str:
        scheme = v.partition("://")[0] if "://" in v else ""
        if scheme not in ("", "file", "s3") or (scheme == "s3" and not v[5:].strip("/")):
            raise ValueError("a directory (file://path or a path) or s3://bucket[/prefix]")
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
        if self.block_ms >= self.redis_socket_timeout_s * 1000:
            raise ValueError(
                "block_ms must stay below redis_socket_timeout_s (REFSTREAM_BLOCK_MS="
                f"{self.block_ms}, REFSTREAM_REDIS_SOCKET_TIMEOUT_S={self.redis_socket_timeout_s:g})"
            )
        return self

    @field_validator("ack_durability")
    @classmethod
    def _known_durability(cls, v: str) -> str:
        parse_durability(v)
        return v.strip().lower()

    @model_validator(mode="after")
    def _sentinel_url(self) -> Settings:
        for url in (self.redis_url, self.arq_redis_url or ""):
            sentinel_target(url)  # a malformed sentinel URL: ValueError, worded
        if self.redis_cluster and sentinel_target(self.redis_url) is not None:
            raise ValueError("a redis+sentinel:// REDIS_URL is not a Redis Cluster: unset REFSTREAM_REDIS_CLUSTER")
        return self

    @model_validator(mode="after")
    def _durability_fits(self) -> Settings:
        replicas, fsync = parse_durability(self.ack_durability)
        if not (replicas or fsync):
            return self
        if self.redis_cluster and fsync:
            raise ValueError(
                "REFSTREAM_ACK_DURABILITY=fsync is not supported on a Redis Cluster (the check for WAITAOF and the"
                " AOF reads one node); use replicas:N, which waits on every primary written"
            )
        if self.ack_wait_ms >= self.redis_deadline_ms:
            raise ValueError(
                "ack_wait_ms must stay below redis_deadline_ms (REFSTREAM_ACK_WAIT_MS="
                f"{self.ack_wait_ms}, REFSTREAM_REDIS_DEADLINE_MS={self.redis_deadline_ms})"
            )
        return self

    @property
    def ack_replicas(self) -> int:
        """N of ``replicas:N``; 0 otherwise."""
        return parse_durability(self.ack_durability)[0]

    @property
    def ack_fsync(self) -> bool:
        return parse_durability(self.ack_durability)[1]

    @model_validator(mode="after")
    def _dedupe_outlives_events(self) -> Settings:
        # a key dropped before its event would let a repeat in while the first is still counted
        if self.dedupe_retention_days < self.event_retention_days:
            raise ValueError(
                f"dedupe_retention_days must be at least event_retention_days (REFSTREAM_DEDUPE_RETENTION_DAYS="
                f"{self.dedupe_retention_days}, REFSTREAM_EVENT_RETENTION_DAYS={self.event_retention_days})"
            )
        return self

    def archive_conflict(self) -> str | None:
        """Why an archiver may not run on these settings, or None. An archiver holds a
        segment's entries up to ``archive_segment_s`` before it writes them, and any member
        of its group reclaims entries idle for ``claim_idle_ms``: were the claim idle time
        the shorter, another archiver could take entries still being gathered and write
        them too. ``refstream archive`` refuses to start on it (the edge and the workers
        have no segments: the rule is not theirs)."""
        if self.claim_idle_ms <= self.archive_segment_s * 1000:
            return (
                f"REFSTREAM_CLAIM_IDLE_MS ({self.claim_idle_ms}) must be above REFSTREAM_ARCHIVE_SEGMENT_S"
                f" ({self.archive_segment_s:g} s) in milliseconds: an archiver holds a segment's entries that long"
                " before it writes them, and entries idle for the claim idle time are reclaimed by another archiver"
            )
        return None

    @property
    def arq_url(self) -> str:
        return self.arq_redis_url or self.redis_url


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


_SECRET = frozenset({"redis_url", "arq_redis_url", "database_url", "secret_key", "console_token"})  # never echoed


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
