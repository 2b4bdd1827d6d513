"""Appending envelopes to their stream partition, through the micro-batcher, or, for
public routes while Redis is unreachable, to the local spool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .batcher import Command
from .connections import REDIS_ERRORS
from .events import Envelope
from .keys import Keys
from .logs import note_event

if TYPE_CHECKING:
    from .state import Edge


def xadd(keys: Keys, envelope: Envelope, routing_key: str) -> Command:
    """XADD with an auto id and no MAXLEN: trimming is the workers' job, by MINID below
    every group's oldest pending entry, so nothing is trimmed before it is acked."""
    return ("XADD", keys.stream_for(routing_key), "*", *envelope.entry())


def check(reply: object) -> None:
    if isinstance(reply, Exception):
        raise reply


def appended(edge: Edge, envelope: Envelope) -> None:
    """``envelope`` went into Redis another way (``ingest.lookup.CHECKED_APPEND``): count it."""
    note_event(envelope.event_id)
    edge.metrics.accepted.labels(envelope.dialect, "redis").inc()


async def append(edge: Edge, envelope: Envelope, routing_key: str, *extra: Command, spool: bool) -> bool:
    """Make ``envelope`` durable: True once it is in Redis, False once it is in the spool.

    ``extra`` commands ride in the same round trip (a click cache entry, say); when the
    event is spooled they are stored with it and replayed with its XADD. Raises what Redis
    raised when ``spool`` is off, ``SpoolFull`` when the spool is at its cap and
    ``SpoolError`` (an OSError) when the disk refused it: the caller must not answer 2xx.

    In Redis means at ``REFSTREAM_ACK_DURABILITY``'s level (``ingest.durability``): short
    of it, ``NotDurable`` is raised or the event spooled like any Redis error. The XADD may
    have reached the primary all the same: the event can then be appended twice under one
    ``event_id``, which the workers store once.
    """
    note_event(envelope.event_id)  # the request's lines name its event
    try:
        replies = await edge.batcher.execute(xadd(edge.keys, envelope, routing_key), *extra, durable=True)
        check(replies[0])  # an error reply too (e.g. OOM under noeviction): spool it
        edge.metrics.accepted.labels(envelope.dialect, "redis").inc()
        return True
    except REDIS_ERRORS:
        if not spool:
            raise
    await edge.spool.append(edge.keys.stream_for(routing_key), envelope.encode(), extra)
    edge.metrics.accepted.labels(envelope.dialect, "spool").inc()
    return False
