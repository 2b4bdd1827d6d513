"""One path rule for every route: a trailing slash, or a doubled one, means what the path
without it means. ``/r/demo/`` is ``/r/demo`` (an unknown code lands on the fallback URL,
never on a bare 404), ``POST /api/track/sale/`` is the sale route: resolved again inside
the edge, never redirected (SDK clients such as httpx do not follow a redirect on POST).

Only for a request the router found nothing for (``ingest.host.app.edge_middleware`` asks
here from its error path), so a well-formed path costs nothing more. What no spelling of
the path matches is answered in JSON, ``{"error": "not_found"}`` (405
``method_not_allowed`` with ``Allow``), never aiohttp's plain text.
"""

from __future__ import annotations

import re

import orjson
from aiohttp import web

_SLASHES = re.compile(r"//+")


def canonical(raw_path: str) -> str | None:
    """``raw_path`` (as sent, its escapes kept) under the rule: runs of ``/`` as one, no
    trailing ``/`` but the root's; None where it is so already."""
    path = _SLASHES.sub("/", raw_path)
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return None if path == raw_path else path


async def alias(request: web.Request) -> web.Request | None:
    """The request under the path the rule gives it, resolved by the app's router (its
    ``match_info`` may be the router's 404 or 405 again); None where the path is under the
    rule already."""
    path = canonical(request.rel_url.raw_path)
    if path is None:
        return None
    again = request.clone(rel_url=request.rel_url.with_path(path, encoded=True, keep_query=True))
    match = await request.app.router.resolve(again)
    match.add_app(request.app)
    match.freeze()
    again._match_info = match  # what aiohttp's own dispatch sets: the handler reads it
    return again


def refusal(exc: web.HTTPException) -> web.Response:
    """The router's 404 or 405 in JSON, its ``Allow`` kept."""
    code = "method_not_allowed" if exc.status == 405 else "not_found"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    body = orjson.dumps({"error": code})
    return web.Response(body=body, status=exc.status, content_type="application/json", headers=headers)
