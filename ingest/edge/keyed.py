"""A keyed event's append, the step ``put_once`` of the routes that take an idempotency key:
the idempotency script instead of the XADD, and what follows when Redis cannot say
(``ingest.edge.idempotency`` holds the key's scripts and records, made once a request by
``Idempotency.prepare``; this module joins them to the append's outcomes in
``ingest.edge.enqueue``, whose ``put`` is the step of an event without a key).

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

from aiohttp import web

from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.events import Envelope
from ingest.contract.links import LinkInfo
from ingest.edge.enqueue import appended, first_reply, never_sent, spool_or_unknown, suppressed, to_spool, unkept
from ingest.edge.idempotency import Answer, Claim, Refuse, replay
from ingest.edge.problem import Down

if TYPE_CHECKING:
    from ingest.edge.state import Edge


async def put_once(
    edge: Edge,
    refuse: Refuse,
    claim: Claim,
    envelope: Envelope,
    routing_key: str,
    answer: bytes,
    headers: dict[str, str] | None,
    *extra: Command,
    link: LinkInfo | None,
    spool: bool,
) -> web.Response:
    """A route's keyed append and its answer: the event (``extra`` in its round trip)
    appended once per ``claim`` (``append_keyed``; one its workspace does not track,
    named by its ``link``, nowhere) and answered ``answer``; a repeat of the key gets the
    first request's answer (422, in the route's ``refuse``, if it asked something else).
    ``spool``: a public route's click, which Redis down sends to the spool; otherwise that
    is the route's 503, raised (``Down``)."""
    try:
        first = await append_keyed(
            edge, claim, envelope, routing_key, Answer(200, answer, claim.fingerprint), *extra, link=link, spool=spool
        )
    except (NotSent, OutcomeUnknown, Outage) as exc:
        raise Down(exc) from exc
    if first is not None:
        return replay(first, claim, refuse, headers)
    return web.Response(body=answer, content_type="application/json", headers=headers)


async def append_keyed(
    edge: Edge,
    claim: Claim,
    envelope: Envelope,
    routing_key: str,
    answer: Answer,
    *extra: Command,
    link: LinkInfo | None,
    spool: bool,
) -> Answer | None:
    """Append ``envelope`` unless ``claim`` has an answer: None when this request's
    ``answer`` stands (Redis's script appended it, or the event is one its workspace does
    not track: ``enqueue.suppressed``, appended nowhere), else the first request's answer.

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
    if suppressed(edge, envelope, link):
        return None
    # on a Redis Cluster whose partition count changed within the window: the key's earlier records first
    prepared = await edge.idem.prepare(edge.batcher, claim, routing_key, envelope, answer)
    if prepared.first is not None:
        return prepared.first
    check, command = prepared.check, prepared.command
    filing = command.beside
    try:
        # its record filed under its event before the script writes it (``erasure_index.Filed``)
        replies = await edge.batcher.execute(*filing, command, *extra, durable=True)
    except (NotSent, OutcomeUnknown) as exc:
        known, first = first_reply(exc, len(filing))
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
    first = replies[len(filing)]
    if isinstance(first, bytes):
        return Answer.decode(first)
    if isinstance(first, Exception):  # refused as a whole (OOM under noeviction): not written
        if not spool:
            raise first
        await to_spool(edge, envelope, routing_key, extra, once=check)
        raise unkept(None, first)
    appended(edge, envelope)
    return None
