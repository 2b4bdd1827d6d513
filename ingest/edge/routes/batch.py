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
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, Field, RootModel, ValidationError

from ingest.contract import clicks, ids, links
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown, Unknown
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.fields import NoNul
from ingest.edge import accept, refund, sale
from ingest.edge.bodies import (
    FINGERPRINT_CONFIDENCE,
    FINGERPRINT_TTL_S,
    AffixoClick,
    BricqsConvert,
    RefportLead,
    new_visitor_id,
)
from ingest.edge.body import BodyError, bounded, describe, read
from ingest.edge.body import code as body_code
from ingest.edge.enqueue import never_sent, to_spool, unkept, xadd
from ingest.edge.idempotency import REPLAYED, REUSED, Answer, Claim, InvalidKey, fingerprint, header_key, valid_key
from ingest.edge.keyed import spool_or_unknown
from ingest.edge.refund import RefportRefund
from ingest.edge.resolve import ClickPending, Unavailable, resolve_click, resolve_link
from ingest.edge.sale import RefportSale
from ingest.edge.state import Edge

log = structlog.get_logger("ingest.batch")
routes = web.RouteTableDef()

MAX_EVENTS = 500


class BatchClick(AffixoClick):
    ip: NoNul | None = Field(None, max_length=64, description="The visitor's address, as your server saw it")
    user_agent: NoNul | None = Field(None, max_length=2048, description="The visitor's User-Agent")


MODELS: dict[str, type[BaseModel]] = {
    "click": BatchClick,
    "lead": RefportLead,
    "conversion": BricqsConvert,
    "sale": RefportSale,
    "refund": RefportRefund,
}


class BatchClickItem(BatchClick):
    type: Literal["click"]


class BatchLeadItem(RefportLead):
    type: Literal["lead"]


class BatchConversionItem(BricqsConvert):
    type: Literal["conversion"]


class BatchSaleItem(RefportSale):
    type: Literal["sale"]


class BatchRefundItem(RefportRefund):
    """Recorded in Postgres at once, in its turn (``ingest.edge.refund``); ``event_id`` is the
    refund's id. Its key: its ``refundId``, else its ``idempotency_key``, else the request's
    ``Idempotency-Key`` and its place."""

    type: Literal["refund"]


BatchItem = Annotated[
    BatchClickItem | BatchLeadItem | BatchConversionItem | BatchSaleItem | BatchRefundItem, Field(discriminator="type")
]


class BatchBody(RootModel[Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_EVENTS)]]):
    """For the documentation: each item names its ``type`` and has the fields of that type."""


class ItemResult(BaseModel):
    index: int
    ok: bool
    event_id: str | None = None
    visitor_id: str | None = None
    match_method: str | None = None
    match_confidence: float | None = None
    error: str | None = None
    detail: str | None = None


class BatchResult(BaseModel):
    accepted: int
    rejected: int
    results: list[ItemResult]


def error(status: int, code: str, detail: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": code, **({"detail": detail} if detail else {})}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


# one lookup for the caller's key (``accept.look_keyed``); the items' lookups and appends are the
# batch's own: each shares one round trip with the other items' (``_accept``)
VOICE = accept.Voice(
    "batch",
    lambda status, code, message: error(status, code, message),
    lambda headers: error(503, "unavailable", headers=headers),
)


def parse_items(raw: bytes, ndjson: bool) -> list[Any]:
    try:
        items = [orjson.loads(line) for line in raw.splitlines() if line.strip()] if ndjson else orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError(400, "invalid_json", "not a JSON array, nor NDJSON") from None
    if not isinstance(items, list):
        raise BodyError(400, "invalid_json", "a JSON array of events (or NDJSON)")
    # each item is a document like a single event's body: the same bounds, and one past
    # them refuses the request whole, as a body past the byte cap or not JSON does
    for i, item in enumerate(items[: MAX_EVENTS + 1]):
        bounded(item, f"events[{i}]")
    return items


@routes.post("/v1/events/batch")
@VOICE.answers
async def batch(request: web.Request) -> web.Response:
    edge, secret = accept.keyed(request)
    if secret is None:
        return error(401, "unauthorized")
    found = await accept.look_keyed(edge, VOICE, secret)
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


def _validate(index: int, item: Any) -> BaseModel | ItemResult:
    kind = item.get("type") if isinstance(item, dict) else None
    model = MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return ItemResult(
            index=index, ok=False, error="invalid", detail="type: one of click, lead, conversion, sale, refund"
        )
    if isinstance(item, dict) and b"\\u0000" in orjson.dumps(item):
        return ItemResult(index=index, ok=False, error="invalid", detail="NUL characters are not allowed")
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        return ItemResult(index=index, ok=False, error="invalid", detail=describe(exc))


def _claim(index: int, item: Any, workspace: str, idem_key: str | None) -> Claim | ItemResult | None:
    """An item's own ``idempotency_key``, else one derived from the request's header and
    the item's place (a retried batch is the same list), else a sale's invoice; None
    without any."""
    own = item.get("idempotency_key") if isinstance(item, dict) else None
    if isinstance(own, str) and ids.placeholder(own):  # no one's key: as if none were sent
        own = None
    if own is None and idem_key is None:
        invoice = item.get("invoiceId") if isinstance(item, dict) and item.get("type") == "sale" else None
        if not isinstance(invoice, str) or ids.placeholder(invoice):  # a placeholder is no one's invoice
            return None
        return sale.claim("batch-sale", workspace, None, {"invoice": invoice})
    asked = fingerprint({k: v for k, v in item.items() if k != "idempotency_key"} if isinstance(item, dict) else item)
    if own is None:
        assert idem_key is not None
        return Claim.of(f"{idem_key}\x00{index}", "batch", workspace, asked)
    try:
        return Claim.of(valid_key(own), "batch-item", workspace, asked)
    except InvalidKey:
        return ItemResult(index=index, ok=False, error="invalid", detail="idempotency_key: 1-255 printable ASCII")


async def _accept(
    edge: Edge, workspace: str, items: list[Any], idem_key: str | None = None
) -> tuple[list[ItemResult], bool]:
    """Each item's result; and whether the batch is a repeat (``Idempotent-Replayed``):
    some item answered from an earlier request's record, and nothing appended anew."""
    parsed = [_validate(i, item) for i, item in enumerate(items)]
    claims = [_claim(i, item, workspace, idem_key) for i, item in enumerate(items)]
    parsed = [
        c if isinstance(c, ItemResult) and not isinstance(p, ItemResult) else p
        for p, c in zip(parsed, claims, strict=True)
    ]
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

    # every lookup of the batch in one round trip: links, the warm flag, clicks, fingerprints
    commands: list[Any] = [("GET", edge.keys.link(c)) for c in codes] + [("GET", edge.keys.links_warm)]
    commands += [("GET", edge.keys.click(c)) for c in click_ids]
    for fp, key in fingerprints.items():
        commands += [("SET", key, candidates[fp], "NX", "EX", FINGERPRINT_TTL_S), ("GET", key)]
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
        if seen[fp] == candidates[fp].encode() and edge.erasure_index is not None:
            filing += edge.erasure_index.fingerprint(("SET", key, candidates[fp]))

    results: list[ItemResult] = []
    appends: list[Any] = []
    sent: list[_Sent] = []  # the item behind each append, in order
    firsts: dict[str, tuple[int, Claim]] = {}  # a key's first item in this batch
    repeats: list[tuple[int, int]] = []  # (item, the earlier item of this batch with its key)
    early = 0  # items answered from their key's record under an earlier partition count
    fresh = refunds_replayed = 0  # refunds made, and answered as an earlier request's
    for index, p in enumerate(parsed):
        if isinstance(p, ItemResult):
            edge.drops.note(workspace, None, "invalid")
            results.append(p)
            continue
        if isinstance(p, RefportRefund):  # recorded now, in its turn: no append
            own = items[index].get("idempotency_key") if isinstance(items[index], dict) else None
            item_key = own if isinstance(own, str) else f"{idem_key}\x00{index}" if idem_key is not None else None
            result, made = await _refund(edge, workspace, index, p, item_key)
            results.append(result)
            fresh, refunds_replayed = fresh + made, refunds_replayed + (result.ok and not made)
            continue
        if isinstance(p, RefportLead) and p.clickId in pending:
            results.append(ItemResult(index=index, ok=False, error="unavailable"))
            continue
        envelope, result = _envelope(index, p, workspace, by_code, by_click, candidates, seen)
        results.append(result)
        if not result.ok:  # refused items: why, for the workspace's stats
            edge.drops.note(workspace, None, "invalid" if result.error == "invalid" else "unknown_code")
        if envelope is None or accept.suppressed(edge, envelope):  # suppressed: answered ok, sent nowhere
            continue
        claim = claims[index]
        answer = None
        if not isinstance(claim, Claim):
            appends.append(xadd(edge.keys, envelope, _route(envelope)))
        elif claim.digest in firsts:  # repeated within the batch: answered as its first, not sent
            first, first_claim = firsts[claim.digest]
            if first_claim.fingerprint == claim.fingerprint:
                repeats.append((index, first))
            else:
                results[-1] = ItemResult(index=index, ok=False, error="idempotency_key_reused", detail=REUSED)
            continue
        else:
            firsts[claim.digest] = (index, claim)
            if edge.idem.cluster and (found := await _earlier(edge, claim, _route(envelope))) is not None:
                results[-1] = _replayed(index, claim, Answer.decode(found))  # the count changed since
                early += 1
                continue
            answer = Answer(
                200, orjson.dumps(result.model_dump(exclude_none=True, exclude={"index"})), claim.fingerprint
            )
            command = edge.idem.append_command(claim, _route(envelope), envelope, answer)
            appends.append(command)
            filing += command.beside
        sent.append(_Sent(result, envelope, claim if isinstance(claim, Claim) else None, answer))
    replays = early + refunds_replayed
    if appends:
        try:
            written = (await edge.batcher.execute(*appends, *filing, durable=True))[: len(appends)]
        except (NotSent, OutcomeUnknown) as exc:
            if never_sent(exc):
                raise  # nothing of the batch is in Redis: the route refuses it (503)
            written = await _settle(edge, sent, exc)
        for reply, item in zip(written, sent, strict=True):
            result, claim = item.result, item.claim
            if isinstance(reply, OutcomeUnknown):  # neither accepted nor refused
                result.ok, result.error = False, "outcome_unknown"
                result.event_id = str(reply.event_id) if reply.event_id else None
                result.detail = "may be stored: retry with the same idempotency key to count it once"
            elif isinstance(reply, Exception):
                result.ok, result.error, result.event_id = False, "unavailable", None
            elif claim is not None and isinstance(reply, bytes):  # a repeat of an earlier batch's item
                results[result.index] = _replayed(result.index, claim, Answer.decode(reply))
                replays += 1
            else:
                fresh += 1
    for index, first in repeats:
        results[index] = results[first].model_copy(update={"index": index})
    return results, replays > 0 and fresh == 0


async def _refund(edge: Edge, workspace: str, index: int, p: RefportRefund, key: str | None) -> tuple[ItemResult, bool]:
    """A refund item's result, and whether it made a refund (False: refused, or a repeat)."""
    out = await refund.record(edge, workspace, p, key, Dialect.NATIVE)
    if out.refund is not None:
        return ItemResult(index=index, ok=True, event_id=out.refund["refund_id"]), not out.replayed
    if out.unknown:
        return ItemResult(
            index=index,
            ok=False,
            error="outcome_unknown",
            detail="may be recorded: retry with the same refundId or key",
        ), False
    return ItemResult(index=index, ok=False, error=out.code, detail=out.message), False


async def _earlier(edge: Edge, claim: Claim, code: str) -> bytes | None:
    """A Redis Cluster's check of a key's records from earlier partition counts
    (``Idempotency.found_earlier``); the append meets any Redis trouble and says it."""
    try:
        return await edge.idem.found_earlier(edge.batcher, claim, code)
    except (NotSent, OutcomeUnknown):
        return None


def _route(envelope: Envelope) -> str:
    route = envelope.routing_key()
    assert route is not None  # every item's envelope has a code or a customer
    return route


@dataclass(slots=True)
class _Sent:
    result: ItemResult
    envelope: Envelope
    claim: Claim | None
    answer: Answer | None


async def _settle(edge: Edge, sent: list[_Sent], exc: BaseException) -> list[Any]:
    """The appends' round trip failed after it was sent: what Redis may hold is spooled under
    its event id (and a keyed item with its check), never refused (``ingest.edge.enqueue``). One
    reply per item, as the round trip's would have been: None or a stream id once spooled,
    the error of an item Redis refused, the outcome ``UNKEPT`` for a keyed item (spooled) and
    where the spool could not keep one."""
    # (the filing commands after the appends: ``ingest.edge.erasure_index``)
    replies: list[Any] = [None] * len(sent)
    if isinstance(exc, OutcomeUnknown) and exc.reason is Unknown.UNCONFIRMED:  # the primary's replies
        replies = list(exc.replies)[: len(sent)]

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


def _replayed(index: int, claim: Claim, first: Answer) -> ItemResult:
    if first.fingerprint != claim.fingerprint:
        return ItemResult(index=index, ok=False, error="idempotency_key_reused", detail=REUSED)
    return ItemResult(index=index, **orjson.loads(first.body))


def _known(seen: object, candidate: str) -> bool:
    """The fingerprint was already mapped to another visitor (our SET NX lost)."""
    return isinstance(seen, bytes) and seen.decode() != candidate


def _envelope(
    index: int,
    p: BaseModel,
    workspace: str,
    by_code: dict[str, links.LinkInfo | None],
    by_click: dict[str, clicks.ClickRef | None],
    candidates: dict[str, str],
    seen: dict[str, Any],
) -> tuple[Envelope | None, ItemResult]:
    if isinstance(p, RefportSale):
        e = sale.envelope(Dialect.NATIVE, workspace, sale.from_refport(p))
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    if isinstance(p, RefportLead):
        click = by_click.get(p.clickId)
        if click is None or click.workspace_id != workspace:
            return None, ItemResult(index=index, ok=False, error="invalid_click_id")
        payload: dict[str, Any] = {
            "code": click.code,
            "click_id": click.click_id,
            "visitor_id": click.visitor_id,
            "name": p.eventName,
            "external_id": p.customerExternalId,
        }
        for field, value in (
            ("email", p.customerEmail),
            ("customer_name", p.customerName),
            ("avatar", p.customerAvatar),
            ("metadata", p.metadata),
        ):
            if value is not None:
                payload[field] = value
        e = Envelope(type=EventType.LEAD, dialect=Dialect.NATIVE, workspace_id=workspace, payload=payload)
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    code = p.ref if isinstance(p, BatchClick) else p.code  # type: ignore[attr-defined]
    link = by_code.get(code)
    if link is None or link.workspace_id != workspace or not link.active:
        return None, ItemResult(index=index, ok=False, error="link_not_found")
    if isinstance(p, BricqsConvert):
        payload = {"code": code, "visitor_id": p.referred_session_id, "dedupe": f"{code}:{p.referred_session_id}"}
        e = Envelope(type=EventType.CONVERSION, dialect=Dialect.NATIVE, workspace_id=workspace, payload=payload)
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    assert isinstance(p, BatchClick)
    if p.visitor_id:
        visitor, method = p.visitor_id, "cookie"
    elif p.fingerprint and _known(seen.get(p.fingerprint), candidates[p.fingerprint]):
        visitor, method = seen[p.fingerprint].decode(), "fingerprint"
    else:
        visitor, method = candidates.get(p.fingerprint or "", None) or new_visitor_id(), "new"
    payload = {"code": code, "visitor_id": visitor, "match": method}
    if p.url:
        payload["page_url"] = p.url
    if p.referrer:
        payload["referrer"] = p.referrer
    e = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.NATIVE,
        workspace_id=workspace,
        payload=payload,
        ip=p.ip,
        user_agent=p.user_agent,
    )
    confidence = {"cookie": 1.0, "fingerprint": FINGERPRINT_CONFIDENCE}.get(method, 0.0)
    return e, ItemResult(
        index=index,
        ok=True,
        event_id=str(e.event_id),
        visitor_id=visitor,
        match_method=method,
        match_confidence=confidence,
    )
