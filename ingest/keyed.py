"""A keyed event's append: the idempotency script instead of the XADD, and what follows
when Redis cannot say (``ingest.idempotency`` holds the key's scripts and records; this
module joins them to the append's outcomes in ``ingest.enqueue``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .batcher import Command
from .connections import REDIS_ERRORS
from .enqueue import OutcomeUnknown, first_reply, never_sent, to_spool
from .events import Envelope
from .idempotency import Answer, Claim
from .logs import note_event
from .spool import SpoolError

if TYPE_CHECKING:
    from .state import Edge


async def append_keyed(
    edge: Edge, claim: Claim, envelope: Envelope, routing_key: str, answer: Answer, *extra: Command, spool: bool
) -> Answer | None:
    """Append ``envelope`` unless ``claim`` has an answer: None when this request's
    ``answer`` stands (appended, or spooled), else the first request's answer.

    At ``REFSTREAM_ACK_DURABILITY``'s level, as ``enqueue.append``: what Redis may hold
    (the primary short of the level, a timeout) is spooled whatever ``spool`` says;
    what it certainly does not hold is spooled only with ``spool`` (public routes: fail
    open, a click is worth more than the check, which the drain makes), else raised.
    A spooled copy keeps the check and the key's dedupe value, and the spool keeps the
    key's record until the key's window ends: a copy that finds one there (spooled first,
    by any process sharing the spool) gets that copy's answer, or Redis's once the drain
    found another copy there first.
    ``OutcomeUnknown`` when the spool fails a copy Redis may hold, or when Redis found
    the key's record but could not confirm it at the level (its first copy may not
    survive: the client retries with the key).
    """
    check = edge.idem.check(claim, routing_key, answer)
    try:
        waiting = await edge.spool.first_answer(check.record)
    except SpoolError:  # a copy may wait there, unseen by Redis: the spool's insert decides
        spooled = await to_spool(edge, envelope, routing_key, extra, once=check)
        return Answer.decode(spooled) if spooled is not None else None
    if waiting is not None:  # a copy waits in the spool: its answer, unless Redis holds another
        return Answer.decode(await redis_record(edge, check.record) or waiting)
    note_event(envelope.event_id)
    command = edge.idem.append_command(claim, routing_key, envelope, answer)
    try:
        replies = await edge.batcher.execute(command, *extra, durable=True)
    except REDIS_ERRORS as exc:
        known, first = first_reply(exc)
        if known and isinstance(first, bytes):
            raise OutcomeUnknown(None, exc) from exc
        if known and first is None:  # appended in the primary, short of the level
            spooled = await to_spool(edge, envelope, routing_key, extra, once=check, maybe_applied=exc)
        elif known or never_sent(exc):  # the script refused, or nothing was sent
            if not spool:
                if known:
                    raise first from exc  # Redis's refusal of the command
                raise
            spooled = await to_spool(edge, envelope, routing_key, extra, once=check)
        else:  # a timeout, a lost connection: it may run yet
            spooled = await to_spool(edge, envelope, routing_key, extra, once=check, maybe_applied=exc)
    else:
        first = replies[0]
        if isinstance(first, bytes):
            return Answer.decode(first)
        if isinstance(first, Exception):  # refused as a whole (OOM under noeviction): not written
            if not spool:
                raise first
            spooled = await to_spool(edge, envelope, routing_key, extra, once=check)
        else:
            edge.metrics.accepted.labels(envelope.dialect, "redis").inc()
            return None
    if spooled is not None:  # a copy of the key was spooled first: its answer stands
        return Answer.decode(spooled)
    return None


async def redis_record(edge: Edge, record: str) -> bytes | None:
    """The key's record in Redis (a copy that reached it before the spooled one drained is
    the one stored), None when it has none or cannot say."""
    try:
        reply = (await edge.batcher.execute(("GET", record)))[0]
    except REDIS_ERRORS:
        return None
    return reply if isinstance(reply, bytes) else None
