"""A keyed event's append: the idempotency script instead of the XADD, and what follows
when Redis cannot say (``ingest.edge.idempotency`` holds the key's scripts and records; this
module joins them to the append's outcomes in ``ingest.edge.enqueue``).

A key asks for one answer, and only Redis's script can say which copy of the key is the
first: a copy whose script Redis did not run (a timeout, a stall, Redis unreachable or
full) is never answered as accepted with its own answer, since another copy of the key,
sent earlier to this edge or another, may run first when Redis resumes. Such a copy is
spooled (with the key's check, so it is stored only if no copy is in Redis when it drains)
and answered "may be stored" (the outcome ``UNKEPT``: ``enqueue.unkept``): the client's retry with the key gets
the stored copy's answer once Redis can say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Envelope
from ingest.contract.logs import note_event
from ingest.edge.enqueue import first_reply, never_sent, to_spool, unkept
from ingest.edge.idempotency import Answer, Claim
from ingest.spool.store import Once

if TYPE_CHECKING:
    from ingest.edge.state import Edge


async def append_keyed(
    edge: Edge, claim: Claim, envelope: Envelope, routing_key: str, answer: Answer, *extra: Command, spool: bool
) -> Answer | None:
    """Append ``envelope`` unless ``claim`` has an answer: None when this request's
    ``answer`` stands (Redis's script appended it), else the first request's answer.

    At ``REFSTREAM_ACK_DURABILITY``'s level, as ``enqueue.append``; the answer stands only
    once the script's run is confirmed at the level. ``UNKEPT`` (503, "may be
    stored") when it appended on the primary short of the level (a failover may lose it;
    the copy is spooled), when Redis may run the script yet (a timeout, a lost connection:
    the copy is spooled), when Redis certainly did not run it but the
    route spools (``spool``: public routes fail open; the copy is spooled), and when Redis
    found the key's record but could not confirm it at the level. What Redis certainly did
    not run, on a route that does not spool, is raised (a refusal, 503). ``SpoolFull`` /
    ``SpoolError`` when the spool cannot keep a copy Redis certainly does not hold.
    """
    check = edge.idem.check(claim, routing_key, answer)
    note_event(envelope.event_id)
    if edge.idem.cluster:  # a count changed within the window: the key's earlier records first
        try:
            if (earlier := await edge.idem.found_earlier(edge.batcher, claim, routing_key)) is not None:
                return Answer.decode(earlier)
        except (NotSent, OutcomeUnknown):
            pass  # the append below meets the same trouble, and says what it means
    command = edge.idem.append_command(claim, routing_key, envelope, answer)
    try:
        # its record filed under its event, after what it writes (``erasure_index.Filed``)
        replies = await edge.batcher.execute(command, *extra, *command.beside, durable=True)
    except (NotSent, OutcomeUnknown) as exc:
        known, first = first_reply(exc)
        if known and isinstance(first, bytes):
            raise unkept(None, exc) from exc
        # Redis may hold it: appended in the primary short of the level (a failover may lose
        # it), or a timeout, a lost connection (it may run yet); else refused, or never sent
        if first is None if known else not never_sent(exc):
            await spool_or_unknown(edge, envelope, routing_key, extra, check, exc)
        elif not spool:
            if known:
                raise first from exc  # Redis's refusal of the command
            raise
        else:
            await to_spool(edge, envelope, routing_key, extra, once=check)
        raise unkept(None, exc) from exc
    first = replies[0]
    if isinstance(first, bytes):
        return Answer.decode(first)
    if isinstance(first, Exception):  # refused as a whole (OOM under noeviction): not written
        if not spool:
            raise first
        await to_spool(edge, envelope, routing_key, extra, once=check)
        raise unkept(None, first)
    edge.metrics.accepted.labels(envelope.dialect, "redis").inc()
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
