"""Seed 004 (Refport): ``POST /api/track/lead``, and ``POST /api/track/sale`` and
``POST /api/track/refund``.

``Authorization: Bearer`` workspace key (scope ``track`` or ``*``). The lead is attributed
to the click named by ``clickId``: any click id refstream minted, found in the click cache
(written when the click was accepted) or, for older clicks, in Postgres. The answer echoes
the event name, the click, its link and the customer. A lead is idempotent on (customer
external id, event name): a second one is accepted and counts nothing.
A sale (``ingest.edge.sale``) names the customer by the external id its lead gave; the
answer echoes the event name, the customer and the sale. A refund (``ingest.edge.refund``)
names its sale's invoice; the answer is the refund as recorded (404 ``SALE_NOT_FOUND``,
409 ``REFUND_EXCEEDS_SALE``, 422 ``IDEMPOTENCY_KEY_REUSED`` or ``REFUND_KEY_REQUIRED``).
Errors: 400 ``INVALID_CLICK_ID`` / ``VALIDATION_ERROR``, 401 ``UNAUTHORIZED``,
429 ``RATE_LIMIT_EXCEEDED``; always ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract import clicks, links
from ingest.contract.clicks import ClickRef
from ingest.contract.connections import REDIS_ERRORS, Command, CommitUnknown
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.edge import accept, refund, sale
from ingest.edge.bodies import RefportLead
from ingest.edge.body import BodyError
from ingest.edge.body import code as body_code
from ingest.edge.idempotency import HEADER, REPLAYED, Claim, InvalidKey, fingerprint, header_key
from ingest.edge.lookup import Found, Guess, Unavailable, fallback, remember, resolve_click, seen, seen_link
from ingest.edge.refund import RefportRefund
from ingest.edge.sale import RefportSale
from ingest.edge.state import Edge

log = structlog.get_logger("ingest.refport")
routes = web.RouteTableDef()


class RefportClick(BaseModel):
    id: str


class RefportLink(BaseModel):
    id: str
    domain: str | None
    key: str
    url: str
    programId: str | None


class RefportCustomer(BaseModel):
    externalId: str
    email: str | None
    name: str | None


class RefportLeadTracked(BaseModel):
    eventName: str
    click: RefportClick
    link: RefportLink
    customer: RefportCustomer


class RefportSaleCustomer(BaseModel):
    externalId: str


class RefportSaleEcho(BaseModel):
    amount: int
    currency: str
    paymentProcessor: str
    invoiceId: str | None
    metadata: dict[str, Any] | None


class RefportSaleTracked(BaseModel):
    eventName: str
    customer: RefportSaleCustomer
    sale: RefportSaleEcho


class RefportErrorBody(BaseModel):
    code: str
    message: str


class RefportError(BaseModel):
    error: RefportErrorBody


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


VOICE = accept.Voice(
    "refport_lead",
    lambda status, code, message: error(status, code.upper(), message),
    lambda headers: error(503, "SERVICE_UNAVAILABLE", "Try again shortly", headers),
)


SALE_VOICE = accept.Voice("refport_sale", VOICE.refuse, VOICE.unavailable)


def _caller(
    request: web.Request, edge: Edge, found: Found, problem: BodyError | None, body: BaseModel | None
) -> web.Response | accept.Admitted:
    """A keyed route's refusals, in their order (the key, its rate limit, the body, the
    ``Idempotency-Key``); else the caller and its key."""
    principal = found.principal
    if principal is None or not principal.allows("track"):
        return error(401, "UNAUTHORIZED", "Invalid or missing API key")
    if not found.verdict.allowed:
        edge.drops.note(principal.workspace_id, None, "rate_limited")
        return error(429, "RATE_LIMIT_EXCEEDED", "Too many requests", found.verdict.headers)
    if problem is not None or body is None:
        edge.drops.note(principal.workspace_id, None, "invalid")
        if problem is None or problem.status == 400:
            return error(400, "VALIDATION_ERROR", problem.message if problem else "invalid body")
        return error(problem.status, body_code(problem).upper(), problem.message)
    try:
        return accept.Admitted(principal, header_key(request))
    except InvalidKey as exc:
        edge.drops.note(principal.workspace_id, None, "invalid")
        return error(400, "VALIDATION_ERROR", str(exc))


def _sale_tracked(body: RefportSale, event: Envelope) -> bytes:
    return orjson.dumps(
        RefportSaleTracked(
            eventName=body.eventName,
            customer=RefportSaleCustomer(externalId=body.customerExternalId),
            sale=RefportSaleEcho(
                amount=body.amount,
                currency=body.currency,
                paymentProcessor=body.paymentProcessor,
                invoiceId=body.invoiceId,
                metadata=body.metadata,
            ),
        ).model_dump()
    )


SALE = sale.SaleDialect(Dialect.REFPORT, SALE_VOICE, RefportSale, _caller, sale.from_refport, _sale_tracked)


@routes.post("/api/track/sale")
async def track_sale(request: web.Request) -> web.Response:
    return await sale.track(request, SALE)


REFUND_VOICE = accept.Voice("refport_refund", VOICE.refuse, VOICE.unavailable)


@routes.post("/api/track/refund")
async def track_refund(request: web.Request) -> web.Response:
    started = await accept.caller(request, REFUND_VOICE, RefportRefund, _caller)
    if isinstance(started, web.Response):
        return started
    workspace, idem_key = started.admitted.principal.workspace_id, started.admitted.idem_key
    out = await refund.record(started.edge, workspace, started.body, idem_key, Dialect.REFPORT)
    headers = dict(started.found.verdict.headers)
    if out.status == 503:
        return REFUND_VOICE.down(CommitUnknown("the refund's commit") if out.unknown else None)
    if out.refund is None:
        return error(out.status, out.code.upper(), out.message, headers)
    if out.replayed:
        headers[REPLAYED] = "true"
    return web.Response(body=orjson.dumps(out.refund), content_type="application/json", headers=headers)


@routes.post("/api/track/lead")
async def track_lead(request: web.Request) -> web.Response:
    edge, secret = accept.keyed(request)
    if secret is None:
        return error(401, "UNAUTHORIZED", "Invalid or missing API key")
    body, problem = await accept.parsed(request, RefportLead)
    click_id = body.clickId if body else None
    reads: tuple[Command, ...] = (("GET", edge.keys.click(click_id)),) if click_id else ()
    made = guess = None
    if body is not None and click_id and HEADER not in request.headers:
        # what this edge last read (the click, its link) says "accept": append in the
        # lookup's own round trip, the link read there too
        _, known_key, _ = edge.auth.cached(secret)
        raw = seen(edge, edge.keys.click(click_id))
        known_click = clicks.decode(click_id, raw) if isinstance(raw, bytes) else None
        if known_key is not None and known_key.allows("track") and known_click is not None:
            known_link = seen_link(edge, known_click.code)
            if known_click.workspace_id == known_key.workspace_id and known_link is not None:
                made = _make(request, edge, body, known_click, known_link)
                guess = Guess(made.envelope, known_click.code)
                reads += (("GET", edge.keys.link(known_click.code)),)
    found = await accept.look(edge, VOICE, edge.key_limiter, "", secret=secret, extra=reads, guess=guess)
    if isinstance(found, web.Response):
        return found
    admitted = _caller(request, edge, found, problem, body)
    if isinstance(admitted, web.Response):
        return admitted
    assert body is not None
    principal, idem_key = admitted.principal, admitted.idem_key

    click_id = body.clickId
    try:
        click = await resolve_click(edge, click_id, found.extra[0])
    except Unavailable:
        return VOICE.down()
    if click is None or click.workspace_id != principal.workspace_id:
        edge.drops.note(principal.workspace_id, None, "unknown_code")
        return error(400, "INVALID_CLICK_ID", "The clickId does not match any recorded click")

    headers = found.verdict.headers
    if found.appended:  # what was read held what the guess was made from: it went in
        assert made is not None
        return accept.accepted(made.resp, headers)
    # the link to echo is found before the lead is appended: nothing can fail after a 2xx is due
    try:
        if len(found.extra) > 1 and made is not None and made.envelope.payload["code"] == click.code:
            cached = found.extra[1]  # read with the click, for the guess
        else:
            (cached,) = await edge.batcher.execute(("GET", edge.keys.link(click.code)))
            remember(edge, edge.keys.link(click.code), cached)
        link = links.decode(cached)
        if not isinstance(link, links.LinkInfo):
            code = click.code
            link = await fallback(edge, lambda: links.fetch(edge.pg, code))
    except Unavailable:
        return VOICE.down()
    except REDIS_ERRORS as exc:
        return VOICE.down(exc)
    resp = orjson.dumps(_tracked(body, click, link).model_dump())
    claim = (
        Claim.of(idem_key, "refport-lead", principal.workspace_id, fingerprint(body.model_dump())) if idem_key else None
    )
    # keyed: Redis down is a 503 (spool=False)
    return await accept.append(
        edge, VOICE, _envelope(request, edge, body, click), click.code, resp, headers, claim=claim, spool=False
    )


@dataclass(frozen=True, slots=True)
class _Made:
    envelope: Envelope
    resp: bytes


def _envelope(request: web.Request, edge: Edge, body: RefportLead, click: ClickRef) -> Envelope:
    payload: dict[str, Any] = {
        "code": click.code,
        "click_id": click.click_id,
        "visitor_id": click.visitor_id,
        "name": body.eventName,
        "external_id": body.customerExternalId,
    }
    for field, value in (
        ("email", body.customerEmail),
        ("customer_name", body.customerName),
        ("avatar", body.customerAvatar),
        ("metadata", body.metadata),
    ):
        if value is not None:
            payload[field] = value
    return accept.event(
        request, edge, EventType.LEAD, Dialect.REFPORT, click.workspace_id, payload, ip=edge.client_ip(request)
    )


def _make(request: web.Request, edge: Edge, body: RefportLead, click: ClickRef, link: links.LinkInfo) -> _Made:
    return _Made(_envelope(request, edge, body, click), orjson.dumps(_tracked(body, click, link).model_dump()))


def _tracked(body: RefportLead, click: ClickRef, link: links.LinkInfo | None) -> RefportLeadTracked:
    if link is None:  # the click's link was deleted after the click: the lead is stored all the same
        link = links.LinkInfo(
            id="",
            workspace_id=click.workspace_id,
            program_id=None,
            affiliate_id=None,
            affiliate_external_id=None,
            code=click.code,
            url="",
            domain=None,
            status="inactive",
            cookie_window_days=0,
            attribution="last_click",
        )
    return RefportLeadTracked(
        eventName=body.eventName,
        click=RefportClick(id=click.click_id),
        link=RefportLink(id=link.id, domain=link.domain, key=link.code, url=link.url, programId=link.program_id),
        customer=RefportCustomer(externalId=body.customerExternalId, email=body.customerEmail, name=body.customerName),
    )
