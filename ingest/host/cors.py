"""CORS for the routes a browser calls from any site: tracker.js, the public click and
conversion routes (Dub's ``/track/click`` among them, whose publishable key a browser sends
as ``Authorization``), the redirect. Any origin, never credentials; a workspace that lists
``allowed_origins`` is enforced by the routes themselves (they know the link). Applied by
each public route's wrapper (``ingest.host.wrap``: the headers on its answers, and its
resource's ``OPTIONS`` route for the preflight), and by no other route's."""

from __future__ import annotations

import re

from aiohttp import web

PUBLIC = re.compile(
    r"^/(tracker\.js|api/v1/track/click|track/click|api/v1/referral/click/[^/]+"
    r"|api/v1/referrals/(validate/[^/]+|convert)|r/[^/]+)$"
)
# on every answer of a public route: who may read it, and what a script may read of it (a
# 503 whose event may be stored says so)
HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": (
        "Retry-After, Refstream-Outcome, Refstream-Event-Id, Idempotent-Replayed, X-Request-ID"
    ),
}
# every request header the API documents for a public route, and the one the edge echoes
# (tests/test_cors.py holds this to /openapi.json, so a header documented later is not forgotten)
ALLOWED_HEADERS = ("Content-Type", "Authorization", "Idempotency-Key", "X-Request-ID")
# on a preflight's answer only, the one a browser reads them from (the Fetch standard's CORS
# check of an actual answer reads the origin and the exposed headers alone)
PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
    "Access-Control-Allow-Headers": ", ".join(ALLOWED_HEADERS),
    "Access-Control-Max-Age": "86400",
    "Vary": "Access-Control-Request-Headers",  # the headers allowed follow those asked for
}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # a header's name (RFC 9110's token)
MAX_ASKED = 32


def is_public(path: str) -> bool:
    """Whether ``path`` is one of the routes a browser calls cross-site."""
    return PUBLIC.match(path) is not None


def preflight(request: web.Request) -> web.Response:
    """The answer to an ``OPTIONS`` preflight on a public route: the documented headers,
    and every other header name the browser asks for (``Access-Control-Request-Headers``,
    up to ``MAX_ASKED``): the routes take no credentials, so a page may send what it likes."""
    asked = request.headers.get("Access-Control-Request-Headers")
    if not asked:
        return web.Response(status=204, headers=PREFLIGHT)
    known = {h.lower() for h in ALLOWED_HEADERS}
    more: list[str] = []
    for name in asked.split(",")[:MAX_ASKED]:
        name = name.strip()
        if _TOKEN.fullmatch(name) and name.lower() not in known:
            known.add(name.lower())
            more.append(name)
    if not more:
        return web.Response(status=204, headers=PREFLIGHT)
    allowed = ", ".join((*ALLOWED_HEADERS, *more))
    return web.Response(status=204, headers={**PREFLIGHT, "Access-Control-Allow-Headers": allowed})
