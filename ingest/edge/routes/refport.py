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

from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract.errors import OutcomeUnknown, Unknown
from ingest.contract.events import Dialect
from ingest.edge import accept, lead, refund, sale
from ingest.edge.bodies import TrackLead
from ingest.edge.body import BodyError
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.dub_shapes import TrackLeadAnswer, TrackSaleAnswer, for_dub_sdk
from ingest.edge.idempotency import REPLAYED, InvalidKey, header_key
from ingest.edge.lookup import Found
from ingest.edge.problem import Problem
from ingest.edge.refund import RefportRefund
from ingest.edge.sale import TrackSale
from ingest.edge.state import Edge

log = structlog.get_logger("ingest.refport")
routes = web.RouteTableDef()


class RefportLeadTracked(TrackLeadAnswer):
    """Refport's lead answer: its documented fields, and beside them the rest of what Dub's
    SDK models require of the same answer (``ingest.edge.dub_shapes``)."""

    eventName: str


RefportSaleTracked = TrackSaleAnswer


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
) -> accept.Admitted:
    """A keyed route's refusals, in their order (the key, its rate limit, the body, the
    ``Idempotency-Key``: raised, ``Problem``, its code upper-cased by ``VOICE``); else the
    caller and its key."""
    principal = found.principal
    if principal is None or not principal.allows("track"):
        raise Problem(401, "unauthorized", "Invalid or missing API key")
    if not found.verdict.allowed:
        edge.drops.note(principal.workspace_id, None, "rate_limited")
        raise Problem(429, "rate_limit_exceeded", "Too many requests", found.verdict.headers)
    if problem is not None or body is None:
        edge.drops.note(principal.workspace_id, None, "invalid")
        if problem is None or problem.status == 400:
            raise Problem(400, "validation_error", problem.message if problem else "invalid body")
        raise Problem(problem.status, body_code(problem), problem.message)
    try:
        return accept.Admitted(principal, header_key(request))
    except InvalidKey as exc:
        edge.drops.note(principal.workspace_id, None, "invalid")
        raise Problem(400, "validation_error", str(exc)) from None


SALE = sale.SaleDialect(
    Dialect.REFPORT,
    SALE_VOICE,
    TrackSale,
    _caller,
    sale.from_refport,
    sale.answer,
    sale.direct_lead,
    lambda: Problem(400, "invalid_click_id", "The clickId does not match any recorded click"),
)


@routes.post("/api/track/sale")
@documented(
    "Track a sale (Refport): attributed to the customer's lead; an invoice counts once, a repeat answered as the first",
    "Refport",
    {200: RefportSaleTracked, **errors(RefportError, 401, 422, 429, 503, *BODY)},
    TrackSale,
    "bearer",
)
async def track_sale(request: web.Request) -> web.Response:
    return for_dub_sdk(request, await sale.track(request, SALE))


REFUND_VOICE = accept.Voice("refport_refund", VOICE.refuse, VOICE.unavailable)


@routes.post("/api/track/refund")
@documented(
    "Refund a sale (Refport), in full or in part: a row of its own, idempotent on "
    "its refundId (or Idempotency-Key), never past the sale's amount (409)",
    "Refport",
    {200: refund.RefundRecorded, **errors(RefportError, 401, 404, 409, 422, 429, 503, *BODY)},
    RefportRefund,
    "bearer",
)
async def track_refund(request: web.Request) -> web.Response:
    return for_dub_sdk(request, await _refund(request))


@REFUND_VOICE.answers
async def _refund(request: web.Request) -> web.Response:
    started = await accept.caller(request, RefportRefund, _caller)
    workspace, idem_key = started.admitted.principal.workspace_id, started.admitted.idem_key
    out = await refund.record(started.edge, workspace, started.body, idem_key, Dialect.REFPORT)
    headers = dict(started.found.verdict.headers)
    if out.status == 503:
        return REFUND_VOICE.down(OutcomeUnknown("the refund's commit", Unknown.COMMIT) if out.unknown else None)
    if out.refund is None:
        return error(out.status, out.code.upper(), out.message, headers)
    if out.replayed:
        headers[REPLAYED] = "true"
    return web.Response(body=orjson.dumps(out.refund), content_type="application/json", headers=headers)


LEAD = lead.LeadDialect(
    Dialect.REFPORT,
    VOICE,
    _caller,
    lead.refport_answer,
    lambda: error(400, "INVALID_CLICK_ID", "The clickId does not match any recorded click"),
    lambda: error(400, "VALIDATION_ERROR", "clickId is empty and this customer has no earlier click"),
    "refport-lead",
)


@routes.post("/api/track/lead")
@documented(
    "Track a lead (Refport, seed 004; Dub's API: its fields, modes and quantities, its SDKs)",
    "Refport",
    {200: RefportLeadTracked, **errors(RefportError, 401, 429, 503, *BODY)},
    TrackLead,
    "bearer",
)
async def track_lead(request: web.Request) -> web.Response:
    return for_dub_sdk(request, await lead.track(request, LEAD))


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "track_sale": sale.STEPS,
    "track_refund": (accept.caller,),
    "track_lead": lead.STEPS,
}
