"""The worker's settings: batches, reads, reclaims, drains, retention and trims, and what the
worker serves beside (metrics, geo, the secrets' key, the console's token)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from .base import CONFIG, renamed, seconds

_SIZE_RE = re.compile(r"^(\d+)\s*(b|kb|mb|gb|k|m|g)?$")
_SIZE_SHIFT = {"b": 0, "kb": 10, "k": 10, "mb": 20, "m": 20, "gb": 30, "g": 30}


class WorkerSettings(BaseSettings):
    model_config = CONFIG

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
        validation_alias=renamed("stream_retention_s", "REFSTREAM_STREAM_RETENTION", "REFSTREAM_RETENTION_S"),
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
        validation_alias=renamed("event_retention_days", "REFSTREAM_EVENT_RETENTION"),
        description="Days of event rows Postgres keeps (daily partitions; daily stats stay).",
    )
    dedupe_retention_days: int = Field(
        400,
        ge=2,
        le=36500,
        validation_alias=renamed("dedupe_retention_days", "REFSTREAM_DEDUPE_RETENTION"),
        description="Days a lead's or conversion's dedupe key is kept (>= event_retention_days).",
    )
    partition_every_s: int = Field(600, ge=10, le=86400, description="Worker: partition maintenance period.")
    webhook_retention_days: int = Field(
        30,
        ge=1,
        le=36500,
        validation_alias=renamed("webhook_retention_days", "REFSTREAM_WEBHOOK_RETENTION"),
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

    @field_validator("console_token", mode="before")
    @classmethod
    def _no_token(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # compose's empty default: none

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
