"""Appending envelopes to their stream partition, through the micro-batcher, or to the
local spool: for public routes while Redis is unreachable, and for every route when the
outcome of an append is not known. ``put`` is the step of a route's event without an
idempotency key (``ingest.edge.keyed.put_once`` the one with a key): it never reads or
writes a key's records.

What a failed append did decides the answer (docs/guarantees.md: a refusal is never
counted):

- nothing was sent (``never_sent``: the batcher's breakers, its queue cap) or Redis refused
  the command (an error reply: a script refuses as a whole, an XADD is not applied): the
  event is not in Redis. Keyed routes refuse (503); public routes spool.
- the outcome is unknown (``OutcomeUnknown``: the primary applied it short of the
  durability level, ``UNCONFIRMED``; a timeout, a connection lost after the write: the
  command may still run when a stalled Redis resumes): the event may be counted, so it is
  never refused. It is spooled under the same ``event_id`` and answered as accepted; the
  workers store one copy (a keyed copy whose script Redis did not run is answered "may be
  stored" instead: ``ingest.edge.keyed``). When the spool cannot keep it either, the outcome
  ``UNKEPT`` (``unkept``): the route answers 503 with
  ``Refstream-Outcome: unknown`` (``retry_headers``), which the README defines as "may be
  stored": a retry with the same ``Idempotency-Key`` counts once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from ingest.contract import wire
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown, Unknown
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.links import LinkInfo
from ingest.contract.logs import note_event
from ingest.edge.problem import Down
from ingest.spool.store import Once

if TYPE_CHECKING:
    from ingest.edge.state import Edge

log = structlog.get_logger("ingest.enqueue")

OUTCOME = "Refstream-Outcome"  # "unknown" on a 503 whose event may be stored
EVENT_ID = "Refstream-Event-Id"  # the event_id of that event


def unkept(event_id: UUID | None, cause: BaseException) -> OutcomeUnknown:
    """The append may have been applied and the spool could not keep a copy: neither
    accepted nor refused (``Unknown.UNKEPT``). Routes answer 503 with ``retry_headers``.
    ``event_id``: None for a repeat whose first copy Redis could not confirm."""
    message = f"event {event_id or '(a repeat)'} may be stored: {cause!r}"
    return OutcomeUnknown(message, Unknown.UNKEPT, event_id=event_id)


def never_sent(exc: BaseException) -> bool:
    """True when ``exc`` proves the request's commands never took effect in Redis: the
    branch ``NotSent`` (the batcher's breakers and queue cap, before sending; an error
    reply, ``Rejected``; a partition gone). Anything else from the batcher may follow a
    write (a timeout, a lost connection): its outcome is unknown."""
    return isinstance(exc, NotSent)


def retry_headers(exc: BaseException | None = None, *, wrote: bool = False) -> dict[str, str]:
    """A 503's headers: ``Retry-After``, and for an outcome answered unknown as it is (an
    append the spool could not keep, a management write's commit lost with Postgres:
    ``OutcomeUnknown.answered_unknown``) ``Refstream-Outcome: unknown``, with the event
    that may be stored where one is named. ``wrote``: a write met ``exc`` on its way (its
    commit may be done, its answer lost with the connection, or a cache refresh after it
    failed): "may be stored" too, never a refusal."""
    headers = {"Retry-After": "1"}
    if wrote:
        headers[OUTCOME] = "unknown"
    if isinstance(exc, OutcomeUnknown) and exc.answered_unknown:
        headers[OUTCOME] = "unknown"
        if exc.event_id is not None:
            headers[EVENT_ID] = str(exc.event_id)
    return headers


def suppressed(edge: Edge, envelope: Envelope, link: LinkInfo | None) -> bool:
    """The event names a visitor, customer or address its workspace does not track: it is
    counted as a drop (``suppressed``, under its ``link`` where the route knows one) and
    appended nowhere (``ingest.privacy.suppressed``)."""
    if not edge.suppress.names(envelope):
        return False
    edge.drops.note(envelope.workspace_id, link.id if link else None, "suppressed")
    return True


def xadd(keys: Keys, envelope: Envelope, routing_key: str) -> Command:
    """XADD with an auto id and no MAXLEN: trimming is the workers' job, by MINID below
    every group's oldest pending entry, so nothing is trimmed before it is acked. NOMKSTREAM:
    a partition that was retired is never made again (``ingest.contract.layout``); the batcher
    turns its empty reply into ``PartitionGone``, a refusal."""
    return ("XADD", keys.stream_for(routing_key), "NOMKSTREAM", "*", *wire.to_entry(envelope))


def check(reply: object) -> None:
    if isinstance(reply, Exception):
        raise reply


def appended(edge: Edge, envelope: Envelope, to: str = "redis") -> None:
    """``envelope`` accepted, into Redis (by any append: ``ingest.edge.lookup.CHECKED_APPEND``
    too) or the spool (``to``): counted, and named on the request's lines from now on."""
    note_event(envelope.event_id)
    edge.metrics.accepted.labels(envelope.dialect, to).inc()


async def to_spool(
    edge: Edge,
    envelope: Envelope,
    routing_key: str,
    extra: Iterable[Command] = (),
    *,
    once: Once | None = None,
    maybe_applied: BaseException | None = None,
) -> bytes | None:
    """Keep ``envelope`` (with its extra commands, and a keyed event's check) in the spool;
    for a keyed event whose key a copy spooled first, that copy's answer instead (this one
    is not kept), else None.

    ``maybe_applied``: the Redis error after which Redis may hold the event already. Then a
    spool that cannot keep it raises the outcome ``UNKEPT``; otherwise what the spool raised
    (``SpoolFull``, ``SpoolError``: the event is nowhere, a refusal)."""
    try:
        first = await edge.spool.append(edge.keys.stream_for(routing_key), wire.to_blob(envelope), extra, once)
    except OSError as exc:  # SpoolError, SpoolFull: what Spool.append raises
        if maybe_applied is None:
            raise
        log.warning("append.outcome_unknown", event_id=str(envelope.event_id), error=maybe_applied, spool=exc)
        raise unkept(envelope.event_id, maybe_applied) from exc
    if first is not None:  # not kept: the key's first copy waits in the spool
        return first
    if maybe_applied is not None:
        log.info("append.settled_in_spool", event_id=str(envelope.event_id), error=maybe_applied)
    appended(edge, envelope, "spool")
    return None


async def spool_or_unknown(
    edge: Edge, envelope: Envelope, routing_key: str, extra: tuple[Command, ...], check: Once, exc: BaseException
) -> None:
    """Spool a keyed copy Redis may hold (kept unless a copy of its key waits there);
    the outcome ``UNKEPT``, naming no event (the key's stored copy may be another's), when the
    spool cannot keep it."""
    try:
        await to_spool(edge, envelope, routing_key, extra, once=check, maybe_applied=exc)
    except OutcomeUnknown as unknown:  # the spool could not keep it
        raise unkept(None, exc) from unknown


def first_reply(exc: BaseException, at: int = 0) -> tuple[bool, Any]:
    """What a failed round trip tells of its command ``at`` (its first, or the first after
    ``at`` filing commands): (known, reply). Known only for the outcome ``UNCONFIRMED``,
    whose replies are the primary's."""
    if isinstance(exc, OutcomeUnknown) and exc.reason is Unknown.UNCONFIRMED and len(exc.replies) > at:
        return True, exc.replies[at]
    return False, None


async def append(edge: Edge, envelope: Envelope, routing_key: str, *extra: Command, spool: bool) -> bool:
    """Make ``envelope`` durable: True once it is in Redis, False once it is in the spool.

    ``extra`` commands ride in the same round trip (a click cache entry, say); when the
    event is spooled they are stored with it and replayed with its XADD.

    ``spool``: the route spools what Redis does not take (public routes). Without it, what
    Redis certainly did not take raises (the route refuses); what Redis may hold, at the
    primary short of ``REFSTREAM_ACK_DURABILITY``'s level or after a timeout, is spooled all
    the same, under the same ``event_id``, which the workers store once. Raises
    the outcome ``UNKEPT`` when that spool fails, ``SpoolFull`` / ``SpoolError`` (OSErrors)
    when the spool refuses an event that is nowhere else: the caller must not answer 2xx.
    """
    command = xadd(edge.keys, envelope, routing_key)
    try:
        replies = await edge.batcher.execute(command, *extra, durable=True)
    except (NotSent, OutcomeUnknown) as exc:
        known, reply = first_reply(exc)
        if known and not isinstance(reply, Exception):  # in the primary, short of the level
            await to_spool(edge, envelope, routing_key, extra, maybe_applied=exc)
        elif known or never_sent(exc):  # refused by Redis, or never sent: nowhere
            if not spool:
                if known:
                    raise reply from exc  # Redis's refusal of the command
                raise
            await to_spool(edge, envelope, routing_key, extra)
        else:  # a timeout, a lost connection: it may be applied yet
            await to_spool(edge, envelope, routing_key, extra, maybe_applied=exc)
        return False
    if isinstance(replies[0], Exception):  # refused (e.g. OOM under noeviction): not written
        if not spool:
            raise replies[0]
        await to_spool(edge, envelope, routing_key, extra)
        return False
    appended(edge, envelope)
    return True


async def put(
    edge: Edge, envelope: Envelope, routing_key: str, *extra: Command, link: LinkInfo | None, spool: bool
) -> bool:
    """A route's plain append (no idempotency key), ``extra`` in its round trip
    (``append``): True once the event is in Redis, False once in the spool (``spool``: a
    public route's event; without it Redis down is the route's 503); else raises the route's
    503 (``Down``). An event its workspace does not track (``suppressed``, named by its
    ``link``) is appended nowhere, and answered as it would be."""
    if suppressed(edge, envelope, link):
        return True
    try:
        return await append(edge, envelope, routing_key, *extra, spool=spool)
    except (NotSent, OutcomeUnknown, Outage) as exc:  # neither Redis nor the spool took it
        raise Down(exc) from exc
