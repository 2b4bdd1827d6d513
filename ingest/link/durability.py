"""What "accepted" means: the acknowledgement level of the edge's writes
(``REFSTREAM_ACK_DURABILITY``).

- ``primary``: the primary executed the XADD. Survives a restart of that Redis process as
  far as its own AOF/RDB configuration goes; not an asynchronous failover, whose promoted
  replica may lack the last writes (the unreplicated tail).
- ``replicas:N``: one ``WAIT N timeout`` ends every micro-batch round trip that holds an
  event: the 2xx waits until N replicas have the batch (they acknowledge the connection's
  replication offset, so everything sent before on it). Survives the loss of the primary
  when a replica that acknowledged is the one promoted (Sentinel promotes the replica with
  the largest offset).
- ``fsync``: ``WAITAOF 1 0 timeout`` (Redis >= 7.2 with ``appendonly yes``): the primary has
  fsynced its AOF up to the batch. Survives a power loss of the primary.

Short of the level there are two cases, and they differ in what Redis holds:

- ``Undurable`` (a ``NotSent``): refused before anything was sent (the batcher's breaker is
  open after an unconfirmed round trip; one probe per interval goes through). Nothing of
  the request is in Redis: a refusal.
- ``OutcomeUnknown`` with the reason ``Unknown.UNCONFIRMED`` (``Durability.failure``): the
  round trip ran on the primary, the confirmation did not come in time. Its ``replies``
  are what the primary answered to the request's own commands, so the caller knows what
  the primary holds (an event appended, a record found).
  The event is in the primary and may or may not survive it: the edge spools it under the
  same ``event_id`` (``ingest.edge.enqueue``), and the workers store it once whichever copy
  arrives first. Never answered as a refusal while it may be counted (docs/guarantees.md, what an answer means).

The spool is an fsynced SQLite file on the edge's own disk, so an event accepted through it
at ``replicas:N`` survives what that file survives: the edge crashing or losing power, and
any loss of Redis servers (the primary and every replica); not the loss of the edge's disk
before it is drained. The drain deletes a row only once N replicas acknowledged it, so from
then on the event has the level's own guarantee.

The workers' reads wait for the level (``workers.group.reads``), and so do the writes an ack
of theirs follows (a dead letter, an entry's filing for the erasure sweep, a parked event:
``ingest.contract.replicated``): replication is a prefix of one primary's history, but a
failover between a write and its ack can send the write to the old primary and the ack to
the new one. Their other writes wait for nothing: losing one redelivers an entry, which the
``event_id`` dedupes. Nothing a worker writes answers a client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.settings import Settings

WAITAOF_SINCE = (7, 2, 0)


class Undurable(NotSent):
    """Refused before sending: writes are known not to reach the durability level now (the
    batcher's breaker is open after an unconfirmed round trip); nothing ran."""


def unconfirmed(message: str) -> OutcomeUnknown:
    """The primary executed the round trip; the level's confirmation did not come in time."""
    return OutcomeUnknown(message, Unknown.UNCONFIRMED)


@dataclass(frozen=True, slots=True)
class Durability:
    replicas: int = 0
    fsync: bool = False
    wait_ms: int = 500

    @classmethod
    def of(cls, settings: Settings) -> Durability:
        return cls(settings.ack_replicas, settings.ack_fsync, settings.ack_wait_ms)

    @property
    def waits(self) -> bool:
        return bool(self.replicas or self.fsync)

    def command(self) -> tuple[Any, ...]:
        """The command that ends a round trip holding a write (only when ``waits``)."""
        if self.fsync:
            return ("WAITAOF", 1, 0, self.wait_ms)
        return ("WAIT", self.replicas, self.wait_ms)

    def failure(self, reply: object) -> OutcomeUnknown | None:
        """None when ``reply`` (to ``command()``) confirms the round trip's writes, else the
        ``Unknown.UNCONFIRMED`` outcome."""
        if isinstance(reply, Exception):
            return unconfirmed(f"{self.command()[0]} failed: {reply}")
        if self.fsync:
            local = reply[0] if isinstance(reply, list) and reply else 0
            if isinstance(local, int) and local >= 1:
                return None
            return unconfirmed(f"the primary did not fsync its AOF within {self.wait_ms} ms")
        if isinstance(reply, int) and reply >= self.replicas:
            return None
        return unconfirmed(f"{reply} of {self.replicas} replicas acknowledged within {self.wait_ms} ms")


def version(info: dict[str, Any]) -> tuple[int, ...]:
    raw = info.get("redis_version", "0")
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return tuple(int(p) for p in raw.split(".")[:3] if p.isdigit())


async def startup_problem(redis: Any, settings: Settings) -> str | None:
    """Why this Redis cannot give the configured level at all (one line), else None.

    ``fsync`` needs WAITAOF (Redis >= 7.2) and the AOF on; waiting would never fix either.
    ``replicas:N`` is not checked here: replicas come and go, and while fewer than N answer
    the edge spools what the primary holds and refuses what it never sent (503)."""
    if not settings.ack_fsync:
        return None
    info = await redis.info("server")
    have = version(info)
    if have < WAITAOF_SINCE:
        shown = ".".join(map(str, have)) or "unknown"
        return (
            f"REFSTREAM_ACK_DURABILITY=fsync needs WAITAOF, Redis >= 7.2, and this Redis is {shown};"
            " upgrade Redis or choose primary or replicas:N"
        )
    persistence = await redis.info("persistence")
    if str(persistence.get("aof_enabled", "0")) != "1":
        return "REFSTREAM_ACK_DURABILITY=fsync needs the AOF on the primary; set appendonly yes"
    return None
