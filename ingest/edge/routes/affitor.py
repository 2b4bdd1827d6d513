"""Seed 002 (Affitor): ``POST /api/v1/track/click``.

Public: the referral link inside ``affiliate_url`` (its ``?aff=`` value) is the only
credential. Answers ``{"success": true, "click_id", "partner_code", "cookie_window_days"}``;
a 400 for each of the seed's error rows, and ``200 {"success": false}`` for an inactive
link. ``existing_click_id`` keeps the visitor's earlier click id (and so its customer).
``additional_data.test_mode`` stores a test event that never moves production counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import clicks
from ingest.contract.events import Dialect
from ingest.contract.fields import NO_NUL, NoNul, OptionalId
from ingest.edge import accept, enqueue, keyed
from ingest.edge.body import BodyError, parse
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.idempotency import Claim, InvalidKey, fingerprint, header_key, valid_key
from ingest.edge.lookup import Guess
from ingest.edge.problem import Problem
from ingest.edge.resolve import seen_link
from ingest.edge.state import EDGE

routes = web.RouteTableDef()

S = 2048  # cap of every free-text field


class AffitorAdditionalData(BaseModel):
    model_config = ConfigDict(extra="allow")
    test_mode: bool = False
    program_id: int | NoNul | None = None


def _affiliate_url_required(schema: dict[str, Any]) -> None:
    # the route answers the seed's own 400 ("affiliate_url is required") when it is missing,
    # so the model takes it optional; the document says what a client must send
    schema.setdefault("required", []).append("affiliate_url")
    schema["properties"]["affiliate_url"] = {"type": "string", "minLength": 1, "maxLength": S, "pattern": NO_NUL}


class AffitorClick(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_affiliate_url_required)
    affiliate_url: NoNul | None = Field(None, max_length=S)
    page_url: NoNul | None = Field(None, max_length=S)
    page_title: NoNul | None = Field(None, max_length=512)
    referrer_url: NoNul | None = Field(None, max_length=S)
    session_id: OptionalId = Field(None, max_length=256)  # a placeholder: not kept
    user_agent: NoNul | None = Field(None, max_length=S)
    screen_resolution: NoNul | None = Field(None, max_length=32)
    viewport_size: NoNul | None = Field(None, max_length=32)
    language: NoNul | None = Field(None, max_length=64)
    timezone: NoNul | None = Field(None, max_length=64)
    existing_click_id: OptionalId = Field(None, max_length=128)  # a placeholder: a click of its own
    additional_data: AffitorAdditionalData | None = None
    dedupe: OptionalId = Field(
        None,
        max_length=255,
        description="An idempotency key (tracker.js sends one per page view's click); a placeholder is none",
    )


class AffitorClickResponse(BaseModel):
    success: bool = True
    click_id: str
    partner_code: str
    cookie_window_days: int


class AffitorTestModeData(BaseModel):
    eventId: str
    programId: int | str | None
    test_mode: bool = True


TEST_MESSAGE = "Test click event tracked successfully"


class AffitorTestModeResponse(BaseModel):
    success: bool = True
    message: str = TEST_MESSAGE
    data: AffitorTestModeData


class AffitorFailure(BaseModel):
    success: bool = False
    error: str


def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return reply(status, {"success": False, "error": message}, headers)


VOICE = accept.Voice(
    "affitor_click",
    lambda status, code, message: fail(status, message),
    lambda headers: fail(503, "Service temporarily unavailable", headers),
)


def aff_code(affiliate_url: str) -> str:
    """The ``aff`` value of the URL; else raises the seed's 400 for why there is none
    (``Problem``, in ``VOICE``'s words)."""
    try:
        parts = urlsplit(affiliate_url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise Problem(400, "invalid_url", "affiliate_url is not a valid URL")
    values = [v for v in parse_qs(parts.query).get("aff", []) if v.strip()]
    if not values:
        raise Problem(400, "no_aff", "No aff parameter found in affiliate_url")
    return values[0].strip()


def _fields(body: AffitorClick, test_mode: bool) -> dict[str, Any]:
    """The click's payload beside its code and ids: the page, as the tracker sent it."""
    fields: dict[str, Any] = {}
    for name in ("page_url", "page_title", "session_id", "screen_resolution", "viewport_size", "language", "timezone"):
        if (value := getattr(body, name)) is not None:
            fields[name] = value
    if body.referrer_url:
        fields["referrer"] = body.referrer_url
    if test_mode:
        fields["test_mode"] = True
    return fields


@routes.post("/api/v1/track/click")
@documented(
    "Track an affiliate click (Affitor, seed 002)",
    "Affitor",
    {
        200: (AffitorClickResponse, AffitorTestModeResponse, AffitorFailure),
        **errors(AffitorFailure, 403, 429, 503, *BODY),
    },
    AffitorClick,
)
@VOICE.answers
async def track_click(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    ip = edge.client_ip(request)
    try:
        body = await parse(request, AffitorClick)
    except BodyError as exc:
        return fail(exc.status, "Invalid JSON body" if exc.kind == "invalid_json" else exc.message)
    if not body.affiliate_url:
        return fail(400, "affiliate_url is required")
    try:  # the header for servers; tracker.js sends it in the body (a header costs a CORS preflight)
        idem_key = header_key(request) or (valid_key(body.dedupe) if body.dedupe is not None else None)
        asked = fingerprint(body.model_dump(exclude={"dedupe"})) if idem_key is not None else None
    except InvalidKey as exc:
        return fail(400, str(exc).replace("Idempotency-Key", "Idempotency-Key (or dedupe)"))
    code = aff_code(body.affiliate_url)
    test_mode = bool(body.additional_data and body.additional_data.test_mode)
    fields = _fields(body, test_mode)
    existing = body.existing_click_id if body.existing_click_id and clicks.parse(body.existing_click_id) else None
    origin = request.headers.get("Origin")
    made = guess = None
    if idem_key is None and existing is None:
        # what this edge last read says "accept": append in the lookup's own round trip
        known = seen_link(edge, code)
        if known is not None and known.configured and known.active and known.allows_origin(origin):
            made = accept.click(request, edge, Dialect.AFFITOR, known, code, fields, ip=ip, user_agent=body.user_agent)
            guess = Guess(made.envelope, code, made.also)
    found = await accept.look(  # public: with Redis down, the link from Postgres and the event to the spool
        edge,
        edge.public_limiter,
        ip or "-",
        code,
        extra=(("GET", edge.keys.click(existing)),) if existing else (),
        guess=guess,
    )
    headers = found.verdict.headers
    match accept.refusal(edge, VOICE.route, code, found, origin):  # the seed's answer for each
        case accept.Refusal.RATE_LIMITED:
            return fail(429, "Too many requests", headers)
        case accept.Refusal.UNRESOLVED:
            return VOICE.down()
        case accept.Refusal.UNKNOWN_CODE:
            return fail(400, f"No referral link found for aff={code}")
        case accept.Refusal.UNCONFIGURED:
            return fail(400, "Referral link configuration is invalid (missing partner or program)")
        case accept.Refusal.INACTIVE:
            return fail(200, "Referral link is inactive")
        case accept.Refusal.ORIGIN:
            return fail(403, "Origin not allowed for this workspace")
    link = found.link
    assert link is not None
    prior = await accept.prior_click(edge, existing, found.extra[0] if existing else None, link.workspace_id)
    # appended: what was read held what the guess was made from, and it went in
    if not found.appended and (made is None or made.envelope.workspace_id != link.workspace_id or prior):
        made = accept.click(
            request, edge, Dialect.AFFITOR, link, code, fields, ip=ip, prior=prior, user_agent=body.user_agent
        )
    assert made is not None
    if test_mode:  # a test click's event (AffitorTestModeResponse), else AffitorClickResponse's fields in order
        program = body.additional_data.program_id if body.additional_data else None
        data = {"eventId": str(made.envelope.event_id), "programId": link.program_id if program is None else program}
        answer = orjson.dumps({"success": True, "message": TEST_MESSAGE, "data": {**data, "test_mode": True}})
    else:  # (the models document the answers; a dict is cheaper to dump)
        answer = orjson.dumps(
            {
                "success": True,
                "click_id": made.click_id,
                "partner_code": code,
                "cookie_window_days": link.cookie_window_days,
            }
        )
    if found.appended:
        return accept.accepted(answer, headers)
    if idem_key is not None and asked is not None:  # public: scoped by the link's workspace and the link
        claim = Claim.of(idem_key, "affitor-click", link.workspace_id, asked, link=code)
        return await keyed.put_once(
            edge, VOICE.refuse, claim, made.envelope, code, answer, headers, *made.also, link=link, spool=True
        )
    await enqueue.put(edge, made.envelope, code, *made.also, link=link, spool=True)
    return accept.accepted(answer, headers)


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "track_click": (
        parse,
        seen_link,
        accept.click,
        accept.look,
        accept.refusal,
        accept.prior_click,
        accept.accepted,
        keyed.put_once,
        enqueue.put,
    ),
}
