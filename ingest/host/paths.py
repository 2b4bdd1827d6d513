"""One path rule for every route: a trailing slash, or a doubled one, means what the path
without it means. ``/r/demo/`` is ``/r/demo`` (an unknown code lands on the fallback URL,
never on a bare 404), ``POST /api/track/sale/`` is the sale route: resolved again inside
the edge, never redirected (SDK clients such as httpx do not follow a redirect on POST).

Only for a request the router found nothing for: the router's last resource
(``Fallback``) takes it, so a well-formed path costs nothing more. What no spelling of the
path matches is answered in JSON, ``{"error": "not_found"}`` (405 ``method_not_allowed``
with ``Allow``), never aiohttp's plain text.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import hdrs, web

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


class Unmatched(web.UrlMappingMatchInfo):
    """The router's answer for a request no route matches: its 404, or its 405 with the
    methods the path has (``http_exception``), answered by ``Fallback``'s route."""

    __slots__ = ("_exception",)

    def __init__(self, route: web.AbstractRoute, exception: web.HTTPException) -> None:
        super().__init__({}, route)
        self._exception = exception

    @property
    def http_exception(self) -> web.HTTPException:
        return self._exception


class Fallback(web.DynamicResource):
    """The router's last resource, at the root of its index: tried after every other, so it
    sees only the requests none matched. Its route tries the request again under the rule
    (``alias``) and hands it to the route it names, wrapper and all; else ``refused`` (the
    JSON 404 or 405, in its own wrapper) answers it."""

    def __init__(
        self, router: web.UrlDispatcher, refused: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        super().__init__("/{unmatched:.*}")
        self._router = router
        self.refused = refused
        self._any = self.add_route(hdrs.METH_ANY, self._dispatch)

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        # the methods of the resources whose path matches (none matched the method): the
        # router's own 405, else its 404; on this error path alone
        allowed: set[str] = set()
        for resource in self._router.resources():
            if resource is not self:
                allowed |= (await resource.resolve(request))[1]
        exc: web.HTTPException = web.HTTPMethodNotAllowed(request.method, allowed) if allowed else web.HTTPNotFound()
        return Unmatched(self._any, exc), set()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        again = await alias(request)
        if again is not None and again.match_info.http_exception is None:
            return await again.match_info.handler(again)  # as if sent so: its route's wrapper answers
        return await self.refused(again if again is not None else request)
