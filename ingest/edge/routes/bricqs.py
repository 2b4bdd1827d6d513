"""Seed 001 (Bricqs): ``/api/v1/referrals``.

- ``POST /generate`` (``X-API-Key``, scope ``write``): the participant's code in the
  campaign (participant = affiliate by external id, campaign = program), created once;
- ``GET /validate/{code}`` (public): from the link cache;
- ``POST /convert`` (public): enqueues a conversion; the ``conversion_id`` is minted here
  and the same one comes back for the same code and ``referred_session_id``;
- ``GET /stats/{participant_id}`` (``X-API-Key``, scope ``read``).
Errors: ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ids
from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, acquired
from ingest.contract.events import Dialect, EventType, uuid7
from ingest.edge import accept
from ingest.edge.auth import Principal, plausible
from ingest.edge.body import BodyError, parse, plain
from ingest.edge.body import code as body_code
from ingest.edge.enqueue import retry_headers
from ingest.edge.fields import ExternalId, NoNul, SessionId
from ingest.edge.idempotency import Claim, InvalidKey, fingerprint, header_key
from ingest.edge.lookup import Found, Unavailable, lookup
from ingest.edge.state import EDGE, Edge
from ingest.manage import admin

log = structlog.get_logger("ingest.bricqs")
routes = web.RouteTableDef()

IDEMPOTENCY_TTL_S = 30 * 86400


class BricqsGenerate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    participant_id: ExternalId = Field(min_length=1, max_length=128)
    campaign_id: uuid.UUID


class BricqsGenerated(BaseModel):
    code: str
    referral_url: str
    participant_id: str
    created_at: str


class BricqsValidated(BaseModel):
    valid: bool
    code: str
    referrer_id: str | None = None
    campaign_id: str | None = None


class BricqsConvert(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: NoNul = Field(min_length=1, max_length=128)
    referred_session_id: SessionId = Field(min_length=1, max_length=256)


class BricqsConverted(BaseModel):
    converted: bool
    referrer_id: str | None
    conversion_id: str


class BricqsMilestone(BaseModel):
    name: str
    threshold: int
    reached_at: str


class BricqsStats(BaseModel):
    participant_id: str
    total_referrals: int
    conversions: int
    pending: int
    referral_code: str | None
    milestones: list[BricqsMilestone] = []


class BricqsError(BaseModel):
    error: str
    message: str


def json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json(status, {"error": code, "message": message}, headers)


def unavailable(exc: BaseException | None = None) -> web.Response:
    return error(503, "unavailable", "Try again shortly", retry_headers(exc))


async def _keyed(request: web.Request, scope: str) -> tuple[Edge, Principal] | web.Response:
    """X-API-Key authentication and the per-key rate limit."""
    edge = request.app[EDGE]
    secret = plausible(request.headers.get("X-API-Key", "").strip())
    if secret is None:
        return error(401, "unauthorized", "Invalid or missing API key")
    try:
        found = await lookup(edge, edge.key_limiter, "", secret=secret)
    except (Unavailable, *REDIS_ERRORS):
        return unavailable()
    if found.principal is None:
        return error(401, "unauthorized", "Invalid or missing API key")
    if not found.principal.allows(scope) or found.principal.kind != "workspace":
        return error(403, "insufficient_scope", f"This key lacks the {scope} scope")
    if not found.verdict.allowed:
        edge.drops.note(found.principal.workspace_id, None, "rate_limited")
        return error(429, "rate_limited", "Too many requests", found.verdict.headers)
    return edge, found.principal


@routes.post("/api/v1/referrals/generate")
async def generate(request: web.Request) -> web.Response:
    keyed = await _keyed(request, "write")
    if isinstance(keyed, web.Response):
        return keyed
    edge, principal = keyed
    try:
        body = await parse(request, BricqsGenerate)
        idem_key = header_key(request)
    except BodyError as exc:
        return error(exc.status, "validation_error" if exc.status == 400 else body_code(exc), exc.message)
    except InvalidKey as exc:
        return error(400, "validation_error", str(exc))

    async def run() -> web.Response:
        try:
            async with acquired(edge.pg) as conn:
                out = await admin.referral_code(
                    conn,
                    edge.redis,
                    edge.keys,
                    workspace_id=principal.workspace_id,
                    program_id=str(body.campaign_id),
                    participant_id=body.participant_id,
                )
        except admin.NotFound as exc:
            return error(404, "campaign_not_found", str(exc))
        except (*PG_ERRORS, *REDIS_ERRORS) as exc:
            return unavailable(exc)  # a lost commit: Refstream-Outcome: unknown
        return json(200, BricqsGenerated(**out).model_dump())

    if idem_key is None:
        return await run()
    # already idempotent per (participant, campaign); the key is honoured like everywhere
    # else: a repeat gets the stored answer, the key with another body a 422
    claim = Claim.of(idem_key, "bricqs-generate", principal.workspace_id, fingerprint(body.model_dump(mode="json")))
    secret = request.headers.get("X-API-Key", "").strip()
    try:
        return await edge.idem.once(edge.batcher, claim, secret, idem_key, run, error)
    except REDIS_ERRORS:
        return unavailable()


async def _public(request: web.Request, code: str | None, extra: tuple[Any, ...] = ()) -> Found | web.Response:
    edge = request.app[EDGE]
    try:
        found = await lookup(
            edge, edge.public_limiter, edge.client_ip(request) or "-", code=code, extra=extra, degraded=True
        )
    except (Unavailable, *REDIS_ERRORS):
        return unavailable()
    if not found.verdict.allowed:
        link = found.link
        edge.drops.note(link.workspace_id if link else None, link.id if link else None, "rate_limited")
        return error(429, "rate_limited", "Too many requests", found.verdict.headers)
    if found.link_unresolved:
        return unavailable()
    return found


@routes.get("/api/v1/referrals/validate/{code}")
async def validate(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    if not plain(code, 128):
        return json(200, BricqsValidated(valid=False, code=code[:128].encode("utf-8", "replace").decode()).model_dump())
    found = await _public(request, code)
    if isinstance(found, web.Response):
        return found
    link = found.link
    if link is None or not link.active or not link.configured:
        return json(200, BricqsValidated(valid=False, code=code).model_dump(), found.verdict.headers)
    out = BricqsValidated(valid=True, code=code, referrer_id=link.affiliate_external_id, campaign_id=link.program_id)
    return json(200, out.model_dump(), found.verdict.headers)


CONVERT_VOICE = accept.Voice(
    "bricqs_convert", error, lambda headers: error(503, "unavailable", "Try again shortly", headers)
)


@routes.post("/api/v1/referrals/convert")
async def convert(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    try:
        body = await parse(request, BricqsConvert)
    except BodyError as exc:
        return error(exc.status, "validation_error" if exc.status == 400 else body_code(exc), exc.message)
    ip = edge.client_ip(request)
    found = await accept.look(edge, CONVERT_VOICE, edge.public_limiter, ip or "-", code=body.code, degraded=True)
    if isinstance(found, web.Response):
        return found
    headers = found.verdict.headers
    match accept.refusal(edge, found, request.headers.get("Origin")):
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
    in_redis = await accept.put(edge, CONVERT_VOICE, envelope, link.code, spool=True)
    if isinstance(in_redis, web.Response):
        return in_redis
    first: object = None
    if in_redis:  # spooled (Redis down): this conversion_id stands; the dedupe key still counts it once
        try:
            _, first = await edge.batcher.execute(
                ("SET", idem, conversion_id, "NX", "EX", IDEMPOTENCY_TTL_S), ("GET", idem)
            )
        except REDIS_ERRORS as exc:  # the conversion is appended: never refused now; this id stands
            log.warning("conversion_id.not_remembered", error=str(exc))
    out = BricqsConverted(
        converted=True,
        referrer_id=link.affiliate_external_id,
        conversion_id=first.decode() if isinstance(first, bytes) else conversion_id,
    )
    return json(200, out.model_dump(), headers)


@routes.get("/api/v1/referrals/stats/{participant_id}")
async def stats(request: web.Request) -> web.Response:
    keyed = await _keyed(request, "read")
    if isinstance(keyed, web.Response):
        return keyed
    edge, principal = keyed
    try:  # the id as generate stores it, then as given (a participant stored before the rule)
        forms = ids.stored_forms(request.match_info["participant_id"], max_length=128)
    except ids.InvalidId:  # nothing can hold it
        return error(404, "participant_not_found", "participant not found")
    out = None
    try:
        async with acquired(edge.pg) as conn:
            for participant in forms:
                try:
                    out = await admin.participant_stats(
                        conn, workspace_id=principal.workspace_id, participant_id=participant
                    )
                    break
                except admin.NotFound:
                    continue
    except PG_ERRORS:
        return unavailable()
    if out is None:
        return error(404, "participant_not_found", f"participant {forms[0]!r} not found")
    return json(200, BricqsStats(**out).model_dump())
