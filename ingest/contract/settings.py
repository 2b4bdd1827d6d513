"""The one settings object.

Built once at the entrypoint (``Settings()`` reads the environment there, never at import
time) and passed down to the edge, the worker and the CLI. Its fields are its groups'
(``ingest.contract.settings_groups``: each group's fields and their own validators); the
rules across groups are here, and so are the errors' wording (``explain``).
"""

from __future__ import annotations

from pydantic import AliasChoices, ValidationError, model_validator

from ingest.contract.sentinel_url import sentinel_target
from ingest.contract.settings_groups.archive import ArchiveSettings, ErasureSettings
from ingest.contract.settings_groups.base import CONFIG, seconds
from ingest.contract.settings_groups.connections import ConnectionSettings, StreamSettings, parse_durability
from ingest.contract.settings_groups.edge import EdgeSettings
from ingest.contract.settings_groups.process import ClockSettings, LoggingSettings
from ingest.contract.settings_groups.worker import WorkerSettings

__all__ = ["Settings", "env_var", "explain", "parse_durability", "seconds"]


# the groups last first: pydantic orders the fields from the last base to the first, and
# that order (connections, streams, edge, worker, clock, archive, erasure, logging) is
# the one of Settings.model_fields, of model_dump and of the validation errors
class Settings(
    LoggingSettings,
    ErasureSettings,
    ArchiveSettings,
    ClockSettings,
    WorkerSettings,
    EdgeSettings,
    StreamSettings,
    ConnectionSettings,
):
    model_config = CONFIG

    # the rules across groups, in this order: the first that fails is the one reported
    @model_validator(mode="after")
    def _block_below_socket_timeout(self) -> Settings:
        # a blocking XREADGROUP longer than the socket timeout would look like a dead socket
        if self.block_ms >= self.redis_socket_timeout_s * 1000:
            raise ValueError(
                "block_ms must stay below redis_socket_timeout_s (REFSTREAM_BLOCK_MS="
                f"{self.block_ms}, REFSTREAM_REDIS_SOCKET_TIMEOUT_S={self.redis_socket_timeout_s:g})"
            )
        return self

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
