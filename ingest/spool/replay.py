"""A drain step's rows on their way to Redis (``ingest.spool.drain``): routed anew when the
partition count changed since they were spooled (``reroute``), an erased person's envelopes
scrubbed (``scrubbed_rows``), and sent in one pipeline ended by the durability level's WAIT
(``replay``), a keyed row through the edge's own script.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from ingest.contract import clock, erasure, erasure_index, wire
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.keys import Keys
from ingest.contract.layout import Layout, PartitionGone, Watch
from ingest.contract.wire import EnvelopeError, entry_from_blob
from ingest.link.choice import Translated
from ingest.link.cluster import ClusterLink
from ingest.link.durability import Durability
from ingest.link.errors import Rejected
from ingest.link.once import APPEND_ONCE
from ingest.spool import store as store

log = structlog.get_logger("ingest.spool")


async def reroute(
    link: Translated, rows: list[store.Row], keys: Keys, layout: Layout
) -> tuple[list[store.Row], list[int]]:
    """(rows to send, ids already done): a row whose partition the edges no longer write (a
    partition count changed: ``ingest.contract.layout``) goes to its code's partition now, and
    a keyed one moves its key's record along, still checked against the record where it was
    (in its script; on a Redis Cluster, whose script cannot reach another slot, read first:
    a row whose key has a copy there is done)."""
    out: list[store.Row] = []
    done: list[int] = []
    counts = layout.earlier(clock.now_ms())  # as the edges' keyed appends look
    for r in rows:
        p = Keys.partition_of(r.stream)
        if p is None or (r.once is None and p < layout.count):
            out.append(r)  # written by the edges, and read: it may stay
            continue
        code = wire.from_blob(r.envelope).routing_key()
        q = keys.partition_for(code, layout.count) if isinstance(code, str) else p % layout.count
        once, earlier = r.once, r.earlier
        if once is not None:
            # a keyed row goes where a copy routed by the current count looks for its key, and
            # is checked against its key's records wherever an earlier count put them (an
            # edge's append by that count may have stored the key's first copy there). Its
            # record's own partition, not its stream's: the two differ when the edge read a
            # new count between the check and the spooling (generative seed 1419696670)
            rp = Keys.record_partition(once.record)
            rp = p if rp is None else rp
            tag = f":idk:{{{rp}}}:"
            others = {p, rp, *(keys.partition_for(code, c) for c in counts)} if isinstance(code, str) else {p, rp}
            records = {x: once.record.replace(tag, f":idk:{{{x}}}:") for x in {*others, q}}
            earlier = tuple(sorted({*earlier, *(records[x] for x in others)} - {records[q]}))
            once = store.Once(records[q], once.answer, once.window_ms)
        if (q, earlier) == (p, r.earlier):
            out.append(r)
            continue
        out.append(replace(r, stream=keys.stream(q), once=once, earlier=earlier))
    if isinstance(link.inner, ClusterLink) and (keyed := [r for r in out if r.earlier]):
        replies = await link.send([("GET", e) for r in keyed for e in r.earlier])
        it = iter(replies)
        found = {r.id for r in keyed if [x for _, x in zip(r.earlier, it, strict=False) if x is not None]}
        done = sorted(found)
        out = [replace(r, earlier=()) if r.earlier else r for r in out if r.id not in found]
    if moved_n := sum(1 for a, b in zip(rows, out, strict=False) if a.stream != b.stream):
        log.info("spool.rerouted", rows=moved_n, count=layout.count)
    return out, done


async def scrubbed_rows(scrub: erasure.Check, rows: list[store.Row]) -> list[store.Row]:
    """``rows`` with an erased person's envelopes scrubbed, and the answer a keyed row stores
    for its key's repeats, and its extra commands (the click cache's entry), without the
    values the scrub took out (``erasure.redact``)."""
    envelopes, where = [], []
    for i, r in enumerate(rows):
        try:
            envelopes.append(wire.from_blob(r.envelope))
            where.append(i)
        except EnvelopeError:
            continue  # the workers dead-letter it, as they would have
    found = await scrub(envelopes) if envelopes else {}
    if not found:
        return rows
    out = list(rows)
    for j, scrubbed in found.items():
        i, before = where[j], envelopes[j]
        once = rows[i].once
        if once is not None:
            once = replace(once, answer=erasure.scrub_answer(once.answer, before, scrubbed))
        extra = erasure.scrub_commands(rows[i].extra, before, scrubbed)  # the click cache's entry
        out[i] = replace(rows[i], envelope=wire.to_blob(scrubbed), once=once, extra=extra)
    log.info("spool.scrubbed", rows=len(found))
    return out


def filed_commands(layout: Watch | None, r: store.Row) -> tuple[Command, ...]:
    """A keyed row's record filed under its event, as the edge files it beside its own
    append (``ingest.contract.erasure_index``): the erasure's sweep reads it there."""
    if r.once is None or layout is None:
        return ()
    try:
        e = wire.from_blob(r.envelope)
    except EnvelopeError:
        return ()
    return erasure_index.record_commands(layout.keys, e, r.once.record, r.once.window_ms)


async def replay(
    link: Translated,
    rows: list[store.Row],
    durability: Durability,
    layout: Watch | None = None,
    routed: Layout | None = None,
) -> tuple[list[int], BaseException | None]:
    """XADD ``rows`` (and their extra commands) in one round trip, ended by the durability
    level's WAIT when it has one: (ids Redis confirmed, the first error). A keyed row goes
    through ``APPEND_ONCE`` instead of its XADD: done whether it appended or found its key's
    record (a copy is in Redis already). A row whose append was refused (a full Redis)
    stays; the others go, unless the WAIT fell short: then all stay. A row keeps its
    envelope as the version-1 blob (``wire.to_blob``); it goes on the stream as
    version 3's packed field."""
    if not rows:
        return [], None
    nomk = ("NOMKSTREAM",) if layout is not None else ()  # without a layout (a bare spool) as ever
    filed = {r.id: filed_commands(layout, r) for r in rows}
    commands: list[Command] = []
    for r in rows:
        fields = [x for pair in entry_from_blob(r.envelope).items() for x in pair]
        if r.once is None:  # NOMKSTREAM: a retired partition is not made again (ingest.contract.layout)
            commands.append(("XADD", r.stream, *nomk, "*", *fields))
        elif layout is None or routed is None or isinstance(link.inner, ClusterLink):  # EVAL: not the hot path
            o = r.once
            commands.append(("EVAL", APPEND_ONCE, 2, o.record, r.stream, o.answer, o.window_ms, "", "", *fields))
        else:  # checked against the count it was routed by (``reroute``): STALE if it changed since
            o, earlier = r.once, r.earlier
            commands.append(
                (
                    "EVAL",
                    APPEND_ONCE,
                    3 + len(earlier),
                    o.record,
                    r.stream,
                    layout.keys.layout,
                    *earlier,
                    o.answer,
                    o.window_ms,
                    routed.count,
                    routed.changed_ms,
                    *fields,
                )
            )
        commands.extend(r.extra)
        commands.extend(filed[r.id])
    if durability.waits:
        commands.append(durability.command())
    try:
        replies = await link.send(commands)
    except (NotSent, OutcomeUnknown) as exc:
        return [], exc  # lost mid-pipeline: what landed is sent again next time (same event ids)
    if durability.waits and (short := durability.failure(replies[-1])) is not None:
        return [], short  # in the primary, not yet where the level says: sent again next time
    sent: list[int] = []
    error: BaseException | None = None
    i = 0
    for r in rows:
        reply = replies[i]
        i += 1 + len(r.extra) + len(filed[r.id])
        if reply is None and r.once is None:  # its stream is gone: routed anew next step
            reply = PartitionGone(f"GONE {r.stream}")
            if layout is not None:
                layout.poke(r.stream)
        if isinstance(reply, Exception):
            code = reply.code if isinstance(reply, Rejected) else ""
            if (code == "GONE" or isinstance(reply, PartitionGone)) and layout is not None:
                layout.poke(r.stream)
            elif code == "STALE" and layout is not None:
                layout.poke()  # the count changed since the reroute: read, routed anew next step
            error = error or reply
            continue
        sent.append(r.id)
    return sent, error
