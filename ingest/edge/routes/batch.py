"""``POST /v1/events/batch``: up to 500 events in one request, for high-volume trackers.

Bearer workspace key, scope ``track``. The body is a JSON array or NDJSON
(``Content-Type: application/x-ndjson``), gzip accepted (``Content-Encoding: gzip``). Each
item names its ``type`` and is validated by the same model as its single-event route:
``click`` as Affixo's ``/v1/track/click`` (plus the visitor's ``ip`` and ``user_agent``,
which a server forwarding clicks knows), ``lead`` as Refport's ``/api/track/lead``,
``conversion`` as Bricqs' ``/convert``, ``sale`` as Refport's ``/api/track/sale`` (its
invoice the item's idempotency key when it has none of its own: ``ingest.edge.sale``).
The answer lists one result per item, in order; a bad item never fails the others. All
lookups of the batch share one Redis round trip, and all its appends another.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract import clicks, links
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown, Unknown
from ingest.contract.events import Dialect, Envelope
from ingest.edge import accept, refund
from ingest.edge.batch_items import (
    MAX_EVENTS,
    BatchClick,
    ItemResult,
    item_claim,
    item_envelope,
    parse_items,
    replayed,
    validated,
)
from ingest.edge.batch_items import BatchBody as BatchBody
from ingest.edge.batch_items import BatchItem as BatchItem
from ingest.edge.batch_items import BatchResult as BatchResult
from ingest.edge.bodies import BricqsConvert, RefportLead, new_visitor_id
from ingest.edge.body import BodyError, read
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.enqueue import never_sent, spool_or_unknown, suppressed, to_spool, unkept, xadd
from ingest.edge.idempotency import REPLAYED, REUSED, Answer, Claim, InvalidKey, header_key
from ingest.edge.lookup import key_lookup
from ingest.edge.problem import ManageError
from ingest.edge.refund import RefportRefund
from ingest.edge.resolve import ClickPending, Unavailable, resolve_click, resolve_link
from ingest.edge.state import Edge

# the items' models and their OpenAPI shapes (``BatchBody``, ``BatchItem``, ``BatchResult``)
# are ``batch_items``'s, named here too
log = structlog.get_logger("ingest.batch")
routes = web.RouteTableDef()


def error(status: int, code: str, detail: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": code, **({"detail": detail} if detail else {})}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


# one lookup for the caller's key and its rate limit (``lookup.key_lookup``); the items' lookups and appends are the
# batch's own: each shares one round trip with the other items' (``_accept``)
VOICE = accept.Voice(
    "batch",
    lambda status, code, message: error(status, code, message),
    lambda headers: error(503, "unavailable", headers=headers),
)


@routes.post("/v1/events/batch")
@documented(
    "Up to 500 events in one request (JSON array or NDJSON, gzip accepted), each "
    "validated like its single-event route; one result per event, a bad event never fails the others",
    "Batch",
    {200: BatchResult, **errors(ManageError, 401, 403, 429, 503, *BODY)},
    BatchBody,
    "bearer",
)
@VOICE.answers
async def batch(request: web.Request) -> web.Response:
    edge, secret = accept.keyed(request)
    if secret is None:
        return error(401, "unauthorized")
    found = await key_lookup(edge, secret)
    principal = found.principal
    if principal is None:
        return error(401, "unauthorized")
    if not principal.allows("track"):
        return web.Response(
            body=orjson.dumps({"error": "insufficient_scope", "need": "track"}),
            status=403,
            content_type="application/json",
        )
    if not found.verdict.allowed:
        edge.drops.note(principal.workspace_id, None, "rate_limited")  # one per refused request
        return error(429, "rate_limited", headers=found.verdict.headers)
    try:
        idem_key = header_key(request)
    except InvalidKey as exc:
        return error(400, "invalid_idempotency_key", str(exc))
    try:
        # read once the key is known: a stranger's body is never read (nor inflated); the cap
        # counts the body both as sent and decompressed
        raw = await read(request, edge.settings.batch_max_bytes)
        items = parse_items(raw, "ndjson" in request.headers.get("Content-Type", ""))
    except BodyError as exc:
        return error(exc.status, body_code(exc, "invalid_json"), exc.message)
    if not items:
        return error(400, "invalid_json", "no events")
    if len(items) > MAX_EVENTS:
        return error(413, "too_many_events", f"at most {MAX_EVENTS} events per request")
    try:
        results, replayed = await _accept(edge, principal.workspace_id, items, idem_key)
    except Unavailable:
        return VOICE.down()
    except (NotSent, OutcomeUnknown, Outage) as exc:  # Redis, or the spool, could not take it
        return VOICE.down(exc)
    accepted = sum(r.ok for r in results)
    out = BatchResult(accepted=accepted, rejected=len(results) - accepted, results=results)
    headers = {**found.verdict.headers, **({REPLAYED: "true"} if replayed else {})}
    return web.Response(
        body=orjson.dumps(out.model_dump(exclude_none=True)), content_type="application/json", headers=headers
    )


async def _accept(
    edge: Edge, workspace: str, items: list[Any], idem_key: str | None = None
) -> tuple[list[ItemResult], bool]:
    """Each item's result; and whether the batch is a repeat (``Idempotent-Replayed``):
    some item answered from an earlier request's record, and nothing appended anew."""
    parsed = [validated(i, item) for i, item in enumerate(items)]
    claims = [item_claim(i, item, workspace, idem_key) for i, item in enumerate(items)]
    parsed = [
        c if isinstance(c, ItemResult) and not isinstance(p, ItemResult) else p
        for p, c in zip(parsed, claims, strict=True)
    ]
    looked = await _look(edge, workspace, parsed)
    b = _Batch(edge, workspace, filing=looked.filing)
    for index, p in enumerate(parsed):
        if isinstance(p, RefportRefund):  # recorded now, in its turn: no append
            await _refund(b, index, p, _refund_key(items[index], index, idem_key))
        else:
            await _item(b, index, p, claims[index], looked)
    if b.appends:
        await _send(b)
    for index, first in b.repeats:
        b.results[index] = b.results[first].model_copy(update={"index": index})
    return b.results, b.replays > 0 and b.fresh == 0


@dataclass(frozen=True, slots=True)
class _Looked:
    """What the batch's lookup found: its codes' links, its leads' clicks (and the recent
    click ids nobody knows yet), each fingerprint's candidate visitor and what its key held,
    and the fingerprint entries the lookup set, filed with the appends."""

    by_code: dict[str, links.LinkInfo | None]
    by_click: dict[str, clicks.ClickRef | None]
    pending: set[str]
    candidates: dict[str, str]
    seen: dict[str, Any]
    filing: list[Any]


async def _look(edge: Edge, workspace: str, parsed: list[BaseModel | ItemResult]) -> _Looked:
    """Every lookup of the batch in one round trip: links, the warm flag, clicks, fingerprints."""
    codes = sorted(
        {p.ref if isinstance(p, BatchClick) else p.code for p in parsed if isinstance(p, BatchClick | BricqsConvert)}
    )
    click_ids = sorted({p.clickId for p in parsed if isinstance(p, RefportLead)})
    fingerprints = {
        p.fingerprint: edge.keys.fingerprint(workspace, hashlib.sha256(p.fingerprint.encode()).hexdigest()[:32])
        for p in parsed
        if isinstance(p, BatchClick) and p.fingerprint and not p.visitor_id
    }
    candidates = {fp: new_visitor_id() for fp in fingerprints}
    commands: list[Any] = [("GET", edge.keys.link(c)) for c in codes] + [("GET", edge.keys.links_warm)]
    commands += [("GET", edge.keys.click(c)) for c in click_ids]
    index = edge.erasure_index
    assert index is not None
    for fp, key in fingerprints.items():
        commands += [index.first_visitor(key, candidates[fp]), ("GET", key)]
    replies = await edge.batcher.execute(*commands)
    warm = replies[len(codes)]
    by_code = {
        code: await resolve_link(edge, code, reply, warm)
        for code, reply in zip(codes, replies[: len(codes)], strict=True)
    }
    offset = len(codes) + 1
    by_click: dict[str, clicks.ClickRef | None] = {}
    pending: set[str] = set()  # recent click ids not known yet: those leads are "unavailable" (retry)
    for cid, reply in zip(click_ids, replies[offset : offset + len(click_ids)], strict=True):
        try:
            by_click[cid] = await resolve_click(edge, cid, reply)
        except ClickPending:
            pending.add(cid)
    offset += len(click_ids)
    seen = {fp: replies[offset + 2 * i + 1] for i, fp in enumerate(fingerprints)}
    # the entries this batch's lookup set (its candidate won), filed with the appends under
    # their visitors (``ingest.edge.erasure_index``); a fingerprint matched files nothing
    filing: list[Any] = []
    for fp, key in fingerprints.items():
        if seen[fp] == candidates[fp].encode():
            filing += index.fingerprint(("SET", key, candidates[fp]))
    return _Looked(by_code, by_click, pending, candidates, seen, filing)


@dataclass(slots=True)
class _Sent:
    result: ItemResult
    envelope: Envelope
    claim: Claim | None
    answer: Answer | None


@dataclass(slots=True)
class _Batch:
    """The batch on its way: each item's result, in order; the appends (one per item sent,
    ``sent``) and what rides with them (``filing``); a key's first item in this batch and
    the items that repeat it; the items answered as an earlier request's (``replays``: a
    key's record, under this or an earlier partition count, or a refund already made) and
    those taken anew (``fresh``: appended, or a refund made)."""

    edge: Edge
    workspace: str
    results: list[ItemResult] = field(default_factory=list)
    appends: list[Any] = field(default_factory=list)
    filing: list[Any] = field(default_factory=list)
    sent: list[_Sent] = field(default_factory=list)
    firsts: dict[str, tuple[int, Claim]] = field(default_factory=dict)
    repeats: list[tuple[int, int]] = field(default_factory=list)  # (item, the earlier item with its key)
    replays: int = 0
    fresh: int = 0


async def _item(
    b: _Batch, index: int, p: BaseModel | ItemResult, claim: Claim | ItemResult | None, looked: _Looked
) -> None:
    """An item (not a refund) answered, or its append added to the batch's."""
    edge, workspace = b.edge, b.workspace
    if isinstance(p, ItemResult):
        edge.drops.note(workspace, None, "invalid")
        b.results.append(p)
        return
    if isinstance(p, RefportLead) and p.clickId in looked.pending:
        b.results.append(ItemResult(index=index, ok=False, error="unavailable"))
        return
    envelope, result = item_envelope(
        index, p, workspace, looked.by_code, looked.by_click, looked.candidates, looked.seen
    )
    b.results.append(result)
    code = p.ref if isinstance(p, BatchClick) else getattr(p, "code", None)
    link = looked.by_code.get(code) if isinstance(code, str) else None
    if not result.ok:  # refused items: why, for the workspace's stats (a code it does not know, for the tail too)
        if result.error == "link_not_found" and (link is None or link.workspace_id != workspace):
            accept.unknown_code(edge, VOICE.route, code, workspace)
        else:
            edge.drops.note(workspace, None, "invalid" if result.error == "invalid" else "unknown_code")
    if envelope is None or suppressed(edge, envelope, link):  # suppressed: answered ok, sent nowhere
        return
    if isinstance(claim, Claim):
        await _keyed(b, index, result, envelope, claim)
    else:
        b.appends.append(xadd(edge.keys, envelope, _route(envelope)))
        b.sent.append(_Sent(result, envelope, None, None))


async def _keyed(b: _Batch, index: int, result: ItemResult, envelope: Envelope, claim: Claim) -> None:
    """An item with an idempotency key: answered as its key's first item in this batch, or
    (on a Redis Cluster) from its key's record under an earlier partition count, else its
    keyed append (``Idempotency.prepare``) added to the batch's."""
    if claim.digest in b.firsts:  # repeated within the batch: answered as its first, not sent
        first, first_claim = b.firsts[claim.digest]
        if first_claim.fingerprint == claim.fingerprint:
            b.repeats.append((index, first))
        else:
            b.results[-1] = ItemResult(index=index, ok=False, error="idempotency_key_reused", detail=REUSED)
        return
    b.firsts[claim.digest] = (index, claim)
    edge = b.edge
    answer = Answer(200, orjson.dumps(result.model_dump(exclude_none=True, exclude={"index"})), claim.fingerprint)
    prepared = await edge.idem.prepare(edge.batcher, claim, _route(envelope), envelope, answer)
    if prepared.first is not None:
        b.results[-1] = replayed(index, claim, prepared.first)  # the count changed since
        b.replays += 1
        return
    command = prepared.command
    b.appends.append(command)
    b.filing += command.beside
    b.sent.append(_Sent(result, envelope, claim, answer))


async def _send(b: _Batch) -> None:
    """The batch's appends (and what rides with them) in one round trip; each sent item's
    result as its reply says. Raises when nothing of it reached Redis (the route's 503)."""
    try:
        # the filing first (``ingest.edge.erasure_index``): nothing is written that it misses
        filed = len(b.filing)
        written = (await b.edge.batcher.execute(*b.filing, *b.appends, durable=True))[filed : filed + len(b.appends)]
    except (NotSent, OutcomeUnknown) as exc:
        if never_sent(exc):
            raise  # nothing of the batch is in Redis: the route refuses it (503)
        written = await _settle(b.edge, b.sent, exc, filed)
    for reply, item in zip(written, b.sent, strict=True):
        result, claim = item.result, item.claim
        if isinstance(reply, OutcomeUnknown):  # neither accepted nor refused
            result.ok, result.error = False, "outcome_unknown"
            result.event_id = str(reply.event_id) if reply.event_id else None
            result.detail = "may be stored: retry with the same idempotency key to count it once"
        elif isinstance(reply, Exception):
            result.ok, result.error, result.event_id = False, "unavailable", None
        elif claim is not None and isinstance(reply, bytes):  # a repeat of an earlier batch's item
            b.results[result.index] = replayed(result.index, claim, Answer.decode(reply))
            b.replays += 1
        else:
            b.fresh += 1


def _refund_key(item: Any, index: int, idem_key: str | None) -> str | None:
    """A refund item's key: its own ``idempotency_key``, else the request's and its place."""
    own = item.get("idempotency_key") if isinstance(item, dict) else None
    return own if isinstance(own, str) else f"{idem_key}\x00{index}" if idem_key is not None else None


async def _refund(b: _Batch, index: int, p: RefportRefund, key: str | None) -> None:
    """A refund item recorded in its turn (``ingest.edge.refund``): made anew, a repeat, or refused."""
    out = await refund.record(b.edge, b.workspace, p, key, Dialect.NATIVE)
    if out.refund is not None:
        b.results.append(ItemResult(index=index, ok=True, event_id=out.refund["refund_id"]))
        if out.replayed:
            b.replays += 1
        else:
            b.fresh += 1
    elif out.unknown:
        detail = "may be recorded: retry with the same refundId or key"
        b.results.append(ItemResult(index=index, ok=False, error="outcome_unknown", detail=detail))
    else:
        b.results.append(ItemResult(index=index, ok=False, error=out.code, detail=out.message))


def _route(envelope: Envelope) -> str:
    route = envelope.routing_key()
    assert route is not None  # every item's envelope has a code or a customer
    return route


async def _settle(edge: Edge, sent: list[_Sent], exc: BaseException, filed: int) -> list[Any]:
    """The appends' round trip failed after it was sent: what Redis may hold is spooled under
    its event id (and a keyed item with its check), never refused (``ingest.edge.enqueue``). One
    reply per item, as the round trip's would have been: None or a stream id once spooled,
    the error of an item Redis refused, the outcome ``UNKEPT`` for a keyed item (spooled) and
    where the spool could not keep one. ``filed``: the filing commands sent before them."""
    replies: list[Any] = [None] * len(sent)
    if isinstance(exc, OutcomeUnknown) and exc.reason is Unknown.UNCONFIRMED:  # the primary's replies
        replies = list(exc.replies)[filed : filed + len(sent)]

    async def one(item: _Sent, reply: Any) -> Any:
        if isinstance(reply, Exception):
            return reply  # Redis refused it: not written
        if isinstance(reply, bytes) and item.claim is not None:  # the key's record, unconfirmed
            return unkept(None, exc)
        code = _route(item.envelope)
        claim, answer = item.claim, item.answer
        try:
            if claim is not None and answer is not None:  # stands only where its script's run is confirmed
                await spool_or_unknown(edge, item.envelope, code, (), edge.idem.check(claim, code, answer), exc)
                return unkept(None, exc)  # (ingest.edge.keyed)
            await to_spool(edge, item.envelope, code, maybe_applied=exc)
        except OutcomeUnknown as unknown:  # the spool could not keep it
            return unknown
        return None  # kept: accepted

    return list(await asyncio.gather(*(one(item, reply) for item, reply in zip(sent, replies, strict=True))))


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
# (its items' lookups and appends are its own: they share one round trip each)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "batch": (key_lookup, read, resolve_click, accept.unknown_code),
}
