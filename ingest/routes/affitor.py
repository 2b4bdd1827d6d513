"""Seed 002 (Affitor): ``POST /api/v1/track/click``.

Public: the referral link inside ``affiliate_url`` (its ``?aff=`` value) is the only
credential. Answers ``{"success": true, "click_id", "partner_code", "cookie_window_days"}``;
a 400 for each of the seed's error rows, and ``200 {"success": false}`` for an inactive
link. ``existing_click_id`` keeps the visitor's earlier click id (and so its customer).
``additional_data.test_mode`` stores a test event that never moves production counters.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from .. import clicks
from ..body import BodyError, header, parse
from ..connections import REDIS_ERRORS
from ..enqueue import append
from ..events import Dialect, Envelope, EventType, uuid7
from ..lookup import Unavailable, lookup, resolve_click
from ..spool import SpoolFull
from ..state import EDGE

log = structlog.get_logger("ingest.affitor")
routes = web.RouteTableDef()

S = 2048  # cap of every free-text field


class AffitorAdditionalData(BaseModel):
    model_config = ConfigDict(extra="allow")
    test_mode: bool = False
    program_id: int | str | None = None


class AffitorClick(BaseModel):
    model_config = ConfigDict(extra="ignore")
    affiliate_url: str | None = Field(None, max_length=S)
    page_url: str | None = Field(None, max_length=S)
    page_title: str | None = Field(None, max_length=512)
    referrer_url: str | None = Field(None, max_length=S)
    session_id: str | None = Field(None, max_length=256)
    user_agent: str | None = Field(None, max_length=S)
    screen_resolution: str | None = Field(None, max_length=32)
    viewport_size: str | None = Field(None, max_length=32)
    language: str | None = Field(None, max_length=64)
    timezone: str | None = Field(None, max_length=64)
    existing_click_id: str | None = Field(None, max_length=128)
    additional_data: AffitorAdditionalData | None = None


class AffitorClickResponse(BaseModel):
    success: bool = True
    click_id: str
    partner_code: str
    cookie_window_days: int


class AffitorTestModeData(BaseModel):
    eventId: str
    programId: int | str | None
    test_mode: bool = True


class AffitorTestModeResponse(BaseModel):
    success: bool = True
    message: str = "Test click event tracked successfully"
    data: AffitorTestModeData


class AffitorFailure(BaseModel):
    success: bool = False
    error: str


def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return reply(status, {"success": False, "error": message}, headers)


def aff_code(affiliate_url: str) -> str | web.Response:
    """The ``aff`` value of the URL, or the seed's 400 for why there is none."""
    try:
        parts = urlsplit(affiliate_url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        return fail(400, "affiliate_url is not a valid URL")
    values = [v for v in parse_qs(parts.query).get("aff", []) if v.strip()]
    if not values:
        return fail(400, "No aff parameter found in affiliate_url")
    return values[0].strip()


@routes.post("/api/v1/track/click")
async def track_click(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    ip = edge.client_ip(request)
    try:
        body = await parse(request, AffitorClick)
    except BodyError as exc:
        return fail(exc.status, "Invalid JSON body" if exc.kind == "invalid_json" else exc.message)
    if not body.affiliate_url:
        return fail(400, "affiliate_url is required")
    code = aff_code(body.affiliate_url)
    if isinstance(code, web.Response):
        return code
    test_mode = bool(body.additional_data and body.additional_data.test_mode)
    existing = body.existing_click_id if body.existing_click_id and clicks.parse(body.existing_click_id) else None

    try:
        found = await lookup(
            edge,
            edge.public_limiter,
            ip or "-",
            code=code,
            extra=(("GET", edge.keys.click(existing)),) if existing else (),
            degraded=True,  # public: with Redis down, the link from Postgres and the event to the spool
        )
        link = found.link
        if not found.verdict.allowed:
            edge.drops.note(link.workspace_id if link else None, link.id if link else None, "rate_limited")
            return fail(429, "Too many requests", found.verdict.headers)
        if found.link_unresolved:
            raise Unavailable
        if link is None:
            edge.drops.note(None, None, "unknown_code")
            return fail(400, f"No referral link found for aff={code}")
        if not link.configured:
            return fail(400, "Referral link configuration is invalid (missing partner or program)")
        if not link.active:
            edge.drops.note(link.workspace_id, link.id, "inactive_link")
            return fail(200, "Referral link is inactive")
        if not link.allows_origin(request.headers.get("Origin")):
            return fail(403, "Origin not allowed for this workspace")
        prior = None
        if existing:
            prior = await resolve_click(edge, existing, found.extra[0])
            if prior is not None and prior.workspace_id != link.workspace_id:
                prior = None  # another workspace's click id: not this visitor
    except Unavailable:
        return fail(503, "Service temporarily unavailable", {"Retry-After": "1"})
    except REDIS_ERRORS as exc:
        log.warning("redis.unavailable", route="affitor_click", error=str(exc))
        return fail(503, "Service temporarily unavailable", {"Retry-After": "1"})

    event_id = uuid7()
    click_id = prior.click_id if prior else clicks.mint(event_id)
    payload: dict[str, Any] = {
        "code": code,
        "click_id": click_id,
        "visitor_id": prior.visitor_id if prior else click_id,
    }
    for name in ("page_url", "page_title", "session_id", "screen_resolution", "viewport_size", "language", "timezone"):
        if (value := getattr(body, name)) is not None:
            payload[name] = value
    if body.referrer_url:
        payload["referrer"] = body.referrer_url
    if test_mode:
        payload["test_mode"] = True
    user_agent = body.user_agent or header(request, "User-Agent", edge.settings.max_string_length)
    envelope = Envelope(
        event_id=event_id,
        type=EventType.CLICK,
        dialect=Dialect.AFFITOR,
        workspace_id=link.workspace_id,
        ip=ip,
        user_agent=user_agent[: edge.settings.max_string_length] if user_agent else None,
        payload=payload,
    )
    extra = []
    if not test_mode and prior is None:
        ref = clicks.ClickRef(click_id, code, link.workspace_id, payload["visitor_id"], envelope.received_at_ms)
        extra.append(ref.cache_command(edge.keys, link.cookie_window_days * 86400))
    try:
        await append(edge, envelope, code, *extra, spool=True)
    except (*REDIS_ERRORS, SpoolFull) as exc:
        log.warning("redis.unavailable", route="affitor_click", error=str(exc))
        return fail(503, "Service temporarily unavailable", {"Retry-After": "1"})

    headers = found.verdict.headers
    if test_mode:
        program = body.additional_data.program_id if body.additional_data else None
        data = AffitorTestModeData(eventId=str(event_id), programId=program if program is not None else link.program_id)
        return reply(200, AffitorTestModeResponse(data=data).model_dump(), headers)
    resp = AffitorClickResponse(click_id=click_id, partner_code=code, cookie_window_days=link.cookie_window_days)
    return reply(200, resp.model_dump(), headers)
