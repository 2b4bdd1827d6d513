"""Seed 000 (bio.re): ``POST /api/v1/referral/click/{code}``.

Public; 60 requests/minute per client IP; a kill switch answers 503
``features.referral_disabled``. Every other outcome is ``200 {"success":true,"data":
{"tracked":true}}``: unknown and inactive codes included (a warn log, nothing counted),
because landing pages must never block on tracking. Beyond the seed, in its error shape:
a body (the seed sends none) past ``REFSTREAM_MAX_BODY_BYTES`` is 413 ``payload_too_large``,
and an ``Origin`` the link's workspace does not list in ``allowed_origins`` is 403
``origin_not_allowed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Dialect, EventType
from ingest.edge import accept, enqueue, flags, keyed
from ingest.edge.body import BodyError, plain, read
from ingest.edge.body import code as body_code
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.idempotency import HEADER, Claim, InvalidKey, fingerprint, header_key
from ingest.edge.lookup import Guess, seen
from ingest.edge.resolve import seen_link
from ingest.edge.state import EDGE

log = structlog.get_logger("ingest.biore")
routes = web.RouteTableDef()

MAX_CODE = 128


class BioreTracked(BaseModel):
    tracked: bool = True


class BioreTrackResponse(BaseModel):
    success: bool = True
    data: BioreTracked


class BioreErrorBody(BaseModel):
    statusCode: int
    code: str
    message: str


class BioreError(BaseModel):
    success: bool = False
    error: BioreErrorBody


TRACKED = orjson.dumps({"success": True, "data": {"tracked": True}})


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """bio.re's error shape: ApiResponse with success false and an i18n key as code."""
    body = {"success": False, "error": {"statusCode": status, "code": code, "message": message}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


# not durable, so not accepted: refuse rather than answer 2xx for a lost event (or, when
# Redis may hold it and the spool cannot, say so: ``retry_headers``)
VOICE = accept.Voice(
    "biore_click", error, lambda headers: error(503, "service_unavailable", "Try again shortly", headers)
)


@routes.post("/api/v1/referral/click/{code}")
@documented(
    "Track a referral click (bio.re, seed 000); no body (one sent "
    "anyway is capped: 413); an Origin the workspace does not allow: 403",
    "bio.re",
    {200: BioreTrackResponse, **errors(BioreError, 403, 429, 503, *BODY)},
)
@VOICE.answers
async def track_click(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    code = request.match_info["code"]
    ip = edge.client_ip(request)
    sane = plain(code, MAX_CODE)
    try:
        await read(request)  # the seed sends no body; one sent anyway is capped like any other
    except BodyError as exc:
        return error(exc.status, "bad_request" if exc.status == 400 else body_code(exc), exc.message)
    flag = edge.keys.flag("referral")
    known = None
    if sane and HEADER not in request.headers and seen(edge, flag) not in (False, flags.DISABLED):
        # what this edge last read says "accept": append in the lookup's own round trip
        known = seen_link(edge, code)
        if known is not None and not (known.active and known.allows_origin(request.headers.get("Origin"))):
            known = None
    payload = {"code": code}
    if referrer := accept.header(request, "Referer", edge.settings.max_string_length):
        payload["referrer"] = referrer
    envelope = guess = None
    if known is not None:
        envelope = accept.event(request, edge, EventType.CLICK, Dialect.BIORE, known.workspace_id, payload, ip=ip)
        guess = Guess(envelope, code)
    looked = code if sane else None
    found = await accept.look(  # public: with Redis down, accept into the spool
        edge, edge.click_limiter, ip or "-", looked, extra=(("GET", flag),), guess=guess
    )
    try:
        disabled = flags.is_disabled(found.extra[0])
    except (NotSent, OutcomeUnknown) as exc:  # the kill switch could not be read (its node failing over)
        return VOICE.down(exc)

    if disabled:
        return error(503, "features.referral_disabled", "The referral feature is disabled")
    headers = found.verdict.headers
    link = found.link
    bad_key: InvalidKey | None = None
    try:  # public: a key is scoped by the link (whose code names its workspace: known or not, the same scope)
        idem_key = header_key(request)
        claim = Claim.of(idem_key, "biore-click", None, fingerprint(code), link=code) if idem_key else None
    except InvalidKey as exc:
        claim, bad_key = None, exc
    # a link without partner or program is taken: the worker decides
    refused = accept.refusal(edge, VOICE.route, looked, found, request.headers.get("Origin"), configured=False)
    if refused is accept.Refusal.RATE_LIMITED:
        return error(429, "throttle", "Too Many Requests", headers)
    if bad_key is not None:  # after the rate limit's refusal, as every route orders them
        return error(400, "validation.idempotency_key", str(bad_key), headers)
    # landing pages never block on tracking: an unknown or inactive code is "tracked"
    if refused is accept.Refusal.UNKNOWN_CODE:
        log.warning("click.unknown_code", code=code[:MAX_CODE].encode("utf-8", "replace").decode())
        return accept.accepted(TRACKED, headers)
    if refused is accept.Refusal.INACTIVE:
        log.warning("click.inactive_link", code=code, link_id=link.id if link else None)
        return accept.accepted(TRACKED, headers)
    if refused is accept.Refusal.ORIGIN:
        # the workspace lists the sites that may send its clicks: as Affitor and Bricqs answer
        return error(403, "origin_not_allowed", "Origin not allowed for this workspace", headers)
    # UNRESOLVED (Postgres down while the link cache is cold): taken, and the worker decides

    if found.appended:  # what was read held what the guess was made from: it went in
        return accept.accepted(TRACKED, headers)
    workspace = link.workspace_id if link else None
    if envelope is None or envelope.workspace_id != workspace:
        envelope = accept.event(request, edge, EventType.CLICK, Dialect.BIORE, workspace, payload, ip=ip)
    if claim is not None:
        return await keyed.put_once(edge, VOICE.refuse, claim, envelope, code, TRACKED, headers, link=link, spool=True)
    await enqueue.put(edge, envelope, code, link=link, spool=True)
    return accept.accepted(TRACKED, headers)


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "track_click": (
        read,
        seen_link,
        accept.event,
        accept.look,
        accept.refusal,
        accept.accepted,
        keyed.put_once,
        enqueue.put,
    ),
}
