"""Seed 003 (Affixo): ``POST /v1/track/click`` and ``POST /v1/track/conversion`` (a sale:
``ingest.edge.sale``), server to server.

``Authorization: Bearer`` workspace key with scope ``track`` (or ``*``); 600 requests a
minute per key. Errors are the OpenAPI's: 400 ``invalid_json``, 401 ``unauthorized``,
403 ``insufficient_scope`` with ``need``, 404 ``link_not_found`` (missing, inactive, or in
another workspace).

Visitor matching: a given ``visitor_id`` is the visitor (``cookie``, 1.0); else a
``fingerprint`` already seen in this workspace gives its visitor (``fingerprint``, 0.8);
else a new visitor id is minted (``new``, 0.0). A fingerprint is remembered for the first
visitor it was seen with (SET NX), for ``FINGERPRINT_TTL_S``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.links import LinkInfo
from ingest.edge import accept, enqueue, keyed, sale
from ingest.edge.bodies import FINGERPRINT_CONFIDENCE, FINGERPRINT_TTL_S, AffixoClick, new_visitor_id
from ingest.edge.body import BodyError
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.idempotency import HEADER, Claim, InvalidKey, fingerprint, header_key
from ingest.edge.lookup import Found, Guess
from ingest.edge.problem import Problem
from ingest.edge.resolve import seen_link
from ingest.edge.sale import AffixoConversion
from ingest.edge.state import Edge

routes = web.RouteTableDef()


class AffixoClickRecorded(BaseModel):
    ok: bool = True
    visitor_id: str
    match_method: str
    match_confidence: float


class AffixoConversionRecorded(BaseModel):
    ok: bool = True
    conversion_id: str
    customer_id: str
    amount: int
    currency: str
    invoice_id: str | None


class AffixoError(BaseModel):
    error: str
    need: str | None = None
    detail: str | None = None


def error(status: int, code: str, headers: dict[str, str] | None = None, **extra: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": code, **extra}), status=status, content_type="application/json", headers=headers
    )


def recorded(visitor: str, method: str, confidence: float) -> bytes:
    """The answer: AffixoClickRecorded's fields, in its order (the model documents it; a
    dict is cheaper to dump)."""
    return orjson.dumps({"ok": True, "visitor_id": visitor, "match_method": method, "match_confidence": confidence})


@dataclass(frozen=True, slots=True)
class _Made:
    envelope: Envelope
    remember: tuple[Command, ...]
    resp: bytes


def _make(request: web.Request, edge: Edge, body: AffixoClick, link: LinkInfo) -> _Made:
    """The event and the answer when no round trip decides the visitor (a visitor id, or
    no fingerprint to look up)."""
    fp_key = (
        edge.keys.fingerprint(link.workspace_id, hashlib.sha256(body.fingerprint.encode()).hexdigest()[:32])
        if body.fingerprint
        else None
    )
    remember: tuple[Command, ...] = ()
    if body.visitor_id:
        visitor, method, confidence = body.visitor_id, "cookie", 1.0
        if fp_key and edge.erasure_index is not None:  # filed under the visitor (``ingest.edge.erasure_index``)
            remember = edge.erasure_index.remembered((("SET", fp_key, visitor, "NX", "EX", FINGERPRINT_TTL_S),))
    else:
        visitor, method, confidence = new_visitor_id(), "new", 0.0
    return _Made(_click(request, edge, body, link, visitor, method), remember, recorded(visitor, method, confidence))


def _click(request: web.Request, edge: Edge, body: AffixoClick, link: LinkInfo, visitor: str, method: str) -> Envelope:
    payload: dict[str, Any] = {"code": link.code, "visitor_id": visitor, "match": method}
    if body.url:
        payload["page_url"] = body.url
    if body.referrer:
        payload["referrer"] = body.referrer
    return accept.event(
        request, edge, EventType.CLICK, Dialect.AFFIXO, link.workspace_id, payload, ip=edge.client_ip(request)
    )


def _caller(
    request: web.Request, edge: Edge, found: Found, problem: BodyError | None, body: BaseModel | None
) -> accept.Admitted:
    """The refusals of Affixo's keyed routes, in their order (the key, its scope, its rate
    limit, the body, the ``Idempotency-Key``: raised, ``Problem``, in ``_shape``); else the
    caller, the link the lookup found in its workspace, and its key."""
    principal = found.principal
    if principal is None:
        raise Problem(401, "unauthorized")
    if not principal.allows("track"):
        raise Problem(403, "insufficient_scope", need="track")
    link = found.link
    mine = link if link is not None and link.workspace_id == principal.workspace_id else None
    if not found.verdict.allowed:
        edge.drops.note(principal.workspace_id, mine.id if mine else None, "rate_limited")
        raise Problem(429, "rate_limited", "600 requests per minute per key", found.verdict.headers)
    if problem is not None or body is None:
        edge.drops.note(principal.workspace_id, None, "invalid")
        if problem is None:
            raise Problem(400, "invalid_json", "invalid body")
        raise Problem(problem.status, body_code(problem, "invalid_json"), problem.message)
    try:
        return accept.Admitted(principal, header_key(request), mine)
    except InvalidKey as exc:
        edge.drops.note(principal.workspace_id, None, "invalid")
        raise Problem(400, "invalid_idempotency_key", str(exc)) from None


def _shape(problem: Problem) -> web.Response:
    """A refusal in Affixo's shape: ``{"error": code}``, its message as ``detail`` and a
    field it names (``need``) where it has them."""
    detail = {"detail": problem.message} if problem.message else {}
    return error(problem.status, problem.code, problem.headers or None, **detail, **problem.fields)


VOICE = accept.Voice(
    "affixo_click",
    lambda status, code, message: error(status, code, detail=message),
    lambda headers: error(503, "unavailable", headers),
    _shape,
)


@routes.post("/v1/track/click")
@documented(
    "Track a click, server to server (Affixo, seed 003)",
    "Affixo",
    {200: AffixoClickRecorded, **errors(AffixoError, 401, 403, 404, 429, 503, *BODY)},
    AffixoClick,
    "bearer",
)
@VOICE.answers
async def track_click(request: web.Request) -> web.Response:
    edge, secret = accept.keyed(request)
    if secret is None:
        return error(401, "unauthorized")
    body, problem = await accept.parsed(request, AffixoClick)
    made = guess = None
    if body is not None and HEADER not in request.headers and (body.visitor_id or not body.fingerprint):
        # what this edge last read says "accept": append in the lookup's own round trip
        _, known_key, _ = edge.auth.cached(secret)
        known = seen_link(edge, body.ref)
        if known_key is not None and known_key.allows("track") and known is not None and known.active:
            if known.workspace_id == known_key.workspace_id:
                made = _make(request, edge, body, known)
                guess = Guess(made.envelope, known.code, made.remember)
    found = await accept.look_keyed(edge, secret, code=body.ref if body else None, guess=guess)
    admitted = _caller(request, edge, found, problem, body)
    principal, mine, idem_key = admitted.principal, admitted.link, admitted.idem_key
    assert body is not None
    if found.link_unresolved:
        return VOICE.down()
    if mine is None:
        accept.unknown_code(edge, VOICE.route, body.ref, principal.workspace_id)
        return error(404, "link_not_found")
    if not mine.active:
        edge.drops.note(principal.workspace_id, mine.id, "inactive_link")
        return error(404, "link_not_found")
    link = mine
    headers = found.verdict.headers
    if found.appended:  # what was read held what the guess was made from: it went in
        assert made is not None
        return accept.accepted(made.resp, headers)
    if body.visitor_id or not body.fingerprint:
        made = _make(request, edge, body, link)
    else:  # a fingerprint to match: one round trip decides the visitor
        fp_key = edge.keys.fingerprint(link.workspace_id, hashlib.sha256(body.fingerprint.encode()).hexdigest()[:32])
        candidate = new_visitor_id()
        assert edge.erasure_index is not None
        try:
            _, seen = await edge.batcher.execute(edge.erasure_index.first_visitor(fp_key, candidate), ("GET", fp_key))
        except (NotSent, OutcomeUnknown) as exc:
            return VOICE.down(exc)
        filing: tuple[Command, ...] = ()
        if isinstance(seen, bytes) and seen.decode() != candidate:
            visitor, method, confidence = seen.decode(), "fingerprint", FINGERPRINT_CONFIDENCE
        else:  # the entry is the new visitor's: filed with the click's append
            visitor, method, confidence = candidate, "new", 0.0
            if seen is not None:  # set by this lookup
                filing = edge.erasure_index.fingerprint(("SET", fp_key, candidate))
        made = _Made(_click(request, edge, body, link, visitor, method), filing, recorded(visitor, method, confidence))
    # keyed: Redis down is a 503 (spool=False)
    if idem_key is None:
        await enqueue.put(edge, made.envelope, link.code, *made.remember, link=link, spool=False)
        return accept.accepted(made.resp, headers)
    claim = Claim.of(idem_key, "affixo-click", link.workspace_id, fingerprint(body.model_dump()))
    return await keyed.put_once(
        edge, VOICE.refuse, claim, made.envelope, link.code, made.resp, headers, *made.remember, link=link, spool=False
    )


CONVERSION_VOICE = accept.Voice("affixo_conversion", VOICE.refuse, VOICE.unavailable, VOICE.shape)


def _recorded(body: AffixoConversion, event: Envelope) -> bytes:
    return orjson.dumps(
        AffixoConversionRecorded(
            conversion_id=str(event.event_id),
            customer_id=body.customer_id,
            amount=body.amount,
            currency=body.currency,
            invoice_id=body.invoice_id,
        ).model_dump()
    )


CONVERSION = sale.SaleDialect(Dialect.AFFIXO, CONVERSION_VOICE, AffixoConversion, _caller, sale.from_affixo, _recorded)


@routes.post("/v1/track/conversion")
@documented(
    "Track a conversion (a sale), server to server (Affixo): attributed to the "
    "customer's lead; an invoice counts once, a repeat answered as the first",
    "Affixo",
    {200: AffixoConversionRecorded, **errors(AffixoError, 401, 403, 422, 429, 503, *BODY)},
    AffixoConversion,
    "bearer",
)
async def track_conversion(request: web.Request) -> web.Response:
    return await sale.track(request, CONVERSION)


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "track_click": (
        accept.parsed,
        seen_link,
        accept.event,
        accept.look_keyed,
        accept.unknown_code,
        accept.accepted,
        enqueue.put,
        keyed.put_once,
    ),
    "track_conversion": sale.STEPS,
}
