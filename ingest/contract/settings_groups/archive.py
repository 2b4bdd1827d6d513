"""The settings of the archive (where segments go, when one is sealed) and of erasure and
the do-not-track lists (deadlines, sweeps, refreshes, bounds)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from .base import CONFIG


class ArchiveSettings(BaseSettings):
    model_config = CONFIG

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

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, v: str) -> str:
        scheme = v.partition("://")[0] if "://" in v else ""
        if scheme not in ("", "file", "s3") or (scheme == "s3" and not v[5:].strip("/")):
            raise ValueError("a directory (file://path or a path) or s3://bucket[/prefix]")
        return v


class ErasureSettings(BaseSettings):
    model_config = CONFIG

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
