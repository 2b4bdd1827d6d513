"""CORS for the routes a browser calls from any site: tracker.js, the public click and
conversion routes, the redirect. Any origin, never credentials; a workspace that lists
``allowed_origins`` is enforced by the routes themselves (they know the link)."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.typedefs import Handler

PUBLIC = re.compile(
    r"^/(tracker\.js|api/v1/track/click|api/v1/referral/click/[^/]+|api/v1/referrals/(validate/[^/]+|convert)|r/[^/]+)$"
)
HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "86400",
}


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not PUBLIC.match(request.path):
        return await handler(request)
    if request.method == "OPTIONS":  # a preflight (tracker.js sends text/plain: it needs none)
        return web.Response(status=204, headers=HEADERS)
    response = await handler(request)
    response.headers.update(HEADERS)
    return response
