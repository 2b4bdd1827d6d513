"""What browsers load: ``/tracker.js``, redirect links ``/r/{code}``, and ``/``.

``GET /r/{code}`` records the click server-side (no JavaScript needed; bots are told apart
by the worker and counted as bot clicks), sets the click-id cookie and answers 302 to the
link's destination, exactly as stored, with the click id appended (``ingest.contract.urls``).
An unknown or inactive code, or any failure, redirects to ``REFSTREAM_FALLBACK_URL``: never
an error page. ``HEAD /r/{code}`` (a mail scanner's, before the person's GET) answers where
the GET would go and records nothing: no event, no rate limit, no drop, no cookie.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from ingest.contract.events import Dialect
from ingest.contract.urls import header_safe, with_param
from ingest.edge import accept, enqueue
from ingest.edge.body import plain
from ingest.edge.documented import documented
from ingest.edge.problem import Down
from ingest.edge.state import EDGE

log = structlog.get_logger("ingest.browser")
routes = web.RouteTableDef()

TRACKER = resources.files("ingest").joinpath("static/tracker.js").read_bytes()
TRACKER_ETAG = '"' + hashlib.sha256(TRACKER).hexdigest()[:16] + '"'
HOME = b"<!doctype html><title>refstream</title><p>Nothing to see here.</p>"


@routes.get("/tracker.js")
@documented("The tracker script a site owner pastes", "Browser", {200: None, 304: None})
async def tracker(request: web.Request) -> web.Response:
    headers = {"ETag": TRACKER_ETAG, "Cache-Control": "public, max-age=3600"}
    if request.headers.get("If-None-Match") == TRACKER_ETAG:
        return web.Response(status=304, headers=headers)
    return web.Response(body=TRACKER, content_type="application/javascript", charset="utf-8", headers=headers)


@routes.get("/")
@documented("A plain page (the default fallback of redirect links)", "Browser", {200: None})
async def home(request: web.Request) -> web.Response:
    return web.Response(body=HOME, content_type="text/html")


def moved(url: str) -> web.Response:
    return web.Response(status=302, headers={"Location": header_safe(url), "Cache-Control": "no-store"})


@routes.head("/r/{code}")
async def redirect_head(request: web.Request) -> web.Response:
    """Where ``GET /r/{code}`` would send the visitor (the link's destination, or the
    fallback), recording nothing: its rate limit is not counted, no drop, no event, no
    cookie (no click id was minted)."""
    edge = request.app[EDGE]
    fallback = moved(edge.settings.fallback_url)
    code = request.match_info["code"]
    if not plain(code, 128):
        return fallback
    voice = accept.Voice("redirect", lambda status, code, message: fallback, lambda headers: fallback)
    try:
        found = await accept.look(edge, edge.public_limiter, "-", code, counted=False)
    except Down as exc:
        return voice.render(exc)
    link = found.link
    if link is None or not link.active or not link.configured:
        return fallback
    return moved(link.url)


@routes.get("/r/{code}", allow_head=False)
@documented(
    "Redirect link: records the click, sets the cookie, 302 to the destination with the "
    "click id; unknown codes 302 to the fallback URL",
    "Browser",
    {302: None},
)
async def redirect(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    settings = edge.settings
    fallback = moved(settings.fallback_url)
    code = request.match_info["code"]
    if not plain(code, 128):
        return fallback
    ip = edge.client_ip(request)
    # a redirect never shows an error page: whatever cannot be looked up goes to the fallback
    voice = accept.Voice("redirect", lambda status, code, message: fallback, lambda headers: fallback)
    try:
        found = await accept.look(edge, edge.public_limiter, ip or "-", code)
    except Down as exc:
        return voice.render(exc)
    link = found.link
    # a redirect link is followed from any site (a navigation sends no Origin): no Origin check
    refused = accept.refusal(edge, voice.route, code, found, None)
    if refused is accept.Refusal.RATE_LIMITED and link is not None and link.active and link.configured:
        return moved(link.url)  # over the limit: the visitor still gets there, uncounted
    if refused is not None or link is None:
        log.warning("redirect.unknown_code", code=code, refused=refused.value if refused else None)
        return fallback

    fields = {}
    if referrer := accept.header(request, "Referer", settings.max_string_length):
        fields["referrer"] = referrer
    made = accept.click(request, edge, Dialect.REDIRECT, link, code, fields, ip=ip)
    click_id = made.click_id
    to_link = moved(link.url)  # not recorded: the visitor still gets there
    recorded = accept.Voice("redirect", voice.refuse, lambda headers: to_link)
    try:
        await enqueue.put(edge, made.envelope, code, *made.also, link=link, spool=True)
    except Down as exc:
        return recorded.render(exc)
    response = moved(with_param(link.url, settings.click_id_param, click_id))
    response.set_cookie(
        settings.cookie_name,
        click_id,
        max_age=link.cookie_window_days * 86400,
        path="/",
        samesite="Lax",
        domain=settings.cookie_domain,
        secure=request.secure or None,
    )
    return response


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "tracker": (),
    "home": (),
    "redirect_head": (accept.look,),
    "redirect": (accept.look, accept.refusal, accept.click, enqueue.put),
}
