"""A process's own settings: its clock (the skew it tolerates; the offset of fault tests)
and its logs."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from ingest.contract import clock
from ingest.contract.logs import AccessLog

from .base import CONFIG


class ClockSettings(BaseSettings):
    model_config = CONFIG

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


class LoggingSettings(BaseSettings):
    model_config = CONFIG

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

    @field_validator("access_log")
    @classmethod
    def _access_log(cls, v: str) -> str:
        AccessLog.parse(v)  # fail fast, at startup
        return v
