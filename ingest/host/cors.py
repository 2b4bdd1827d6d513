"""CORS for the routes a browser calls from any site: tracker.js, the public click and
conversion routes, the redirect. Any origin, never credentials; a workspace that lists
``allowed_origins`` is enforced by the routes themselves (they know the link). Applied by
the edge's one middleware (``ingest.host.app.edge_middleware``)."""

from __future__ import annotations

import re

from aiohttp import web

PUBLIC = re.compile(
    r"^/(tracker\.js|api/v1/track/click|api/v1/referral/click/[^/]+|api/v1/referrals/(validate/[^/]+|convert)|r/[^/]+)$"
)
# on every answer of a public route: who may read it, and what a script may read of it (a
# 503 whose event may be stored says so)
HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After, Refstream-Outcome, Refstream-Event-Id, Idempotent-Replayed",
}
# on a preflight's answer only, the one a browser reads them from (the Fetch standard's CORS
# check of an actual answer reads the origin and the exposed headers alone)
PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}


def is_public(path: str) -> bool:
    """Whether ``path`` is one of the routes a browser calls cross-site."""
    return PUBLIC.match(path) is not None


def preflight() -> web.Response:
    """The answer to an ``OPTIONS`` preflight on a public route."""
    return web.Response(status=204, headers=PREFLIGHT)
