"""Seed 001 (Bricqs): ``/api/v1/referrals``, its tracking calls.

- ``GET /validate/{code}`` (public): from the link cache;
- ``POST /convert`` (public): enqueues a conversion; the ``conversion_id`` is minted here
  and the same one comes back for the same code and ``referred_session_id``.
Errors: ``{"error": code, "message": text}``. Its management calls, ``POST /generate`` and
``GET /stats/{participant_id}``, read and write Postgres through the management API: they
are ``ingest/manage/routes/bricqs.py``, in the same shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Dialect, EventType, uuid7
from ingest.edge import accept, enqueue
from ingest.edge.bodies import BricqsConvert
from ingest.edge.body import BodyError, parse, plain
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.enqueue import retry_headers
from ingest.edge.lookup import Found
from ingest.edge.problem import Down, Problem
from ingest.edge.state import EDGE

log = structlog.get_logger("ingest.bricqs")
routes = web.RouteTableDef()

IDEMPOTENCY_TTL_S = 30 * 86400


class BricqsValidated(BaseModel):
    valid: bool
    code: str
    referrer_id: str | None = None
    campaign_id: str | None = None


class BricqsConverted(BaseModel):
    converted: bool
    referrer_id: str | None
    conversion_id: str


class BricqsError(BaseModel):
    error: str
    message: str


def json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json(status, {"error": code, "message": message}, headers)


def unavailable(exc: BaseException | None = None) -> web.Response:
    return error(503, "unavailable", "Try again shortly", retry_headers(exc))


# the public routes' refusals, raised below the route (``Problem``, ``Down``) and said here
PUBLIC_VOICE = accept.Voice(
    "bricqs_public", error, lambda headers: error(503, "unavailable", "Try again shortly", headers)
)


async def _public(request: web.Request, code: str | None) -> Found:
    """The public lookup (``accept.look``); raises the route's 429 (``Problem``) or 503 (``Down``)."""
    edge = request.app[EDGE]
    counted = request.method != "HEAD"  # a HEAD changes nothing, its rate limit included
    found = await accept.look(edge, edge.public_limiter, edge.client_ip(request) or "-", code, counted=counted)
    if not found.verdict.allowed:
        link = found.link
        edge.drops.note(link.workspace_id if link else None, link.id if link else None, "rate_limited")
        raise Problem(429, "rate_limited", "Too many requests", found.verdict.headers)
    if found.link_unresolved:
        raise Down()
    return found


@routes.get("/api/v1/referrals/validate/{code}")
@documented("Validate a referral code", "Bricqs", {200: BricqsValidated, **errors(BricqsError, 429, 503)})
@PUBLIC_VOICE.answers
async def validate(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    if not plain(code, 128):
        return json(200, BricqsValidated(valid=False, code=code[:128].encode("utf-8", "replace").decode()).model_dump())
    found = await _public(request, code)
    link = found.link
    if link is None or not link.active or not link.configured:
        return json(200, BricqsValidated(valid=False, code=code).model_dump(), found.verdict.headers)
    out = BricqsValidated(valid=True, code=code, referrer_id=link.affiliate_external_id, campaign_id=link.program_id)
    return json(200, out.model_dump(), found.verdict.headers)


CONVERT_VOICE = accept.Voice(
    "bricqs_convert", error, lambda headers: error(503, "unavailable", "Try again shortly", headers)
)


@routes.post("/api/v1/referrals/convert")
@documented(
    "Convert a referral",
    "Bricqs",
    {200: BricqsConverted, **errors(BricqsError, 403, 404, 429, 503, *BODY)},
    BricqsConvert,
    idempotent=True,  # on (code, session)
)
@CONVERT_VOICE.answers
async def convert(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    try:
        body = await parse(request, BricqsConvert)
    except BodyError as exc:
        return error(exc.status, "validation_error" if exc.status == 400 else body_code(exc), exc.message)
    ip = edge.client_ip(request)
    found = await accept.look(edge, edge.public_limiter, ip or "-", body.code)
    headers = found.verdict.headers
    match accept.refusal(edge, CONVERT_VOICE.route, body.code, found, request.headers.get("Origin")):
        case accept.Refusal.RATE_LIMITED:
            return error(429, "rate_limited", "Too many requests", headers)
        case accept.Refusal.UNRESOLVED:
            return CONVERT_VOICE.down()
        case accept.Refusal.UNKNOWN_CODE | accept.Refusal.UNCONFIGURED | accept.Refusal.INACTIVE:
            return error(404, "invalid_code", f"Referral code {body.code!r} is not valid")
        case accept.Refusal.ORIGIN:
            return error(403, "origin_not_allowed", "Origin not allowed for this workspace")
    link = found.link
    assert link is not None
    event_id = uuid7()
    conversion_id = "conv_" + event_id.hex
    payload = {
        "code": link.code,
        "visitor_id": body.referred_session_id,
        "conversion_id": conversion_id,
        "dedupe": f"{link.code}:{body.referred_session_id}",
    }
    envelope = accept.event(
        request, edge, EventType.CONVERSION, Dialect.BRICQS, link.workspace_id, payload, ip=ip, event_id=event_id
    )
    session = hashlib.sha256(body.referred_session_id.encode()).hexdigest()[:32]
    idem = edge.keys.idempotency("bricqs-convert", f"{body.code}:{session}")

    # appended first, then the conversion_id remembered: an id is never handed out for an
    # event that was not appended. A repeat keeps the first id; its own event is appended
    # too, and the worker's dedupe key makes it count nothing.
    in_redis = await enqueue.put(edge, envelope, link.code, link=link, spool=True)
    first: object = None
    if in_redis:  # spooled (Redis down): this conversion_id stands; the dedupe key still counts it once
        try:
            _, first = await edge.batcher.execute(
                ("SET", idem, conversion_id, "NX", "EX", IDEMPOTENCY_TTL_S), ("GET", idem)
            )
        except (NotSent, OutcomeUnknown) as exc:  # the conversion is appended: never refused now; this id stands
            log.warning("conversion_id.not_remembered", error=exc)
    out = BricqsConverted(
        converted=True,
        referrer_id=link.affiliate_external_id,
        conversion_id=first.decode() if isinstance(first, bytes) else conversion_id,
    )
    return json(200, out.model_dump(), headers)


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "validate": (accept.look,),
    "convert": (parse, accept.look, accept.refusal, accept.event, enqueue.put),
}
