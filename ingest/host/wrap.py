"""Each route's wrapper, assembled once, when the route is registered, from the parts that
route needs (issue 66 decision 1): no middleware runs around every request.

Every wrapper gives its request an id (``X-Request-ID`` when the client sent a sane one,
else minted; echoed, and on every line logged while it runs), marks the connection busy for
the connection guard, counts the request in the metrics under its route's template, writes
the access line as ``REFSTREAM_ACCESS_LOG`` says, and answers an unexpected error as a bare
500 (503 for a database outage), never a trace. Beside that, a route holds only the parts
of its kind (``Parts``): a public route (``ingest.host.cors``) the CORS headers on its
answers and an ``OPTIONS`` route of its own for the preflight; a route that reads a body the
close of a connection whose body was refused; a keyed server-to-server route neither.

There is one wrapper, a closure over its route's parts, made by ``Frame.wrap``: a part is
one branch on a constant there, so one implementation of each serves every route, and a
request pays for no layer it does not need. A path the router found nothing for goes to the
router's last resource (``ingest.host.paths.Fallback``): tried again under the one path
rule, it is the route it names, wrapper and all; else the JSON 404 or 405, wrapped as
``unmatched``."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import hdrs, web

from ingest.contract.connections import pg_unavailable
from ingest.contract.events import unique_token
from ingest.contract.logs import CURRENT_REQUEST, DEFAULT_ACCESS_LOG, AccessLog, RequestLog, error_fields
from ingest.edge.body import CLOSE
from ingest.edge.enqueue import retry_headers
from ingest.edge.metrics import EdgeMetrics
from ingest.edge.problem import is_outage
from ingest.host import cors, paths
from ingest.host.guard import ConnectionGuard

log = structlog.get_logger("ingest.app")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNAVAILABLE = orjson.dumps({"error": "service_unavailable"})
INTERNAL = orjson.dumps({"error": "internal_error"})
UNMATCHED = "unmatched"  # the route a request the router found nothing for is counted under
# the methods whose requests carry a body a route reads (and may refuse)
WITH_BODY = frozenset({hdrs.METH_POST, hdrs.METH_PUT, hdrs.METH_PATCH})
MAY_WRITE = WITH_BODY | {hdrs.METH_DELETE}


@dataclass(frozen=True, slots=True)
class Parts:
    """What a route's wrapper does beside what every route's does."""

    cors: bool = False  # a public route's answers carry the headers a browser reads them by
    closes: bool = False  # a body it refused (too large, too slow, unreadable) closes the connection

    @classmethod
    def of(cls, method: str, route: str) -> Parts:
        """The parts of a route by its method and template: CORS for a public one (the
        preflight is its resource's ``OPTIONS`` route), the close for one that reads a body."""
        return cls(cors=cors.is_public(route), closes=method in WITH_BODY)


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= 64 and given.isascii() and given.isprintable():
        return given
    return unique_token()


def unexpected(request: web.Request, route: str, exc: Exception) -> web.Response:
    """An error the route did not answer: 503 for an outage (a database's, or one of ours:
    a workspace whose move outlasted the wait for its fence), else a bare 500. A request
    that writes is answered ``Refstream-Outcome: unknown`` then: what it wrote before the
    error (a commit whose answer was lost with the connection) may stand."""
    if is_outage(exc):
        # a route's own handling missed an outage (read-only, not migrated, ...): "try
        # again", never a 500 for what is not the request's fault
        event = "request.postgres_unavailable" if pg_unavailable(exc) else "request.unavailable"
        log.warning(event, route=route, error=type(exc).__name__)
        headers = retry_headers(exc, wrote=request.method in MAY_WRITE)
        return web.Response(body=UNAVAILABLE, status=503, content_type="application/json", headers=headers)
    # the error's kind and where it was raised, never its message: a database error's text
    # quotes the value it refused, which may be a person's id, address or email
    log.error("request.failed", method=request.method, route=route, **error_fields(exc))
    return web.Response(body=INTERNAL, status=500, content_type="application/json")


async def preflight(request: web.Request) -> web.StreamResponse:
    """A public resource's ``OPTIONS`` route: the preflight's answer (``cors.preflight``)."""
    return cors.preflight(request)


async def refused(request: web.Request) -> web.StreamResponse:
    """The router's 404 or 405 for a path no spelling of which matches, in JSON."""
    exc = request.match_info.http_exception
    assert exc is not None
    return paths.refusal(exc)


class Frame:
    """What every route's wrapper shares: the metrics, the access line's setting and the
    connection guard; ``wrap`` makes one route's wrapper, ``add_routes`` registers routes
    each with its own, ``close`` adds the router's last resource (``paths.Fallback``)."""

    def __init__(
        self, metrics: EdgeMetrics, access: AccessLog = DEFAULT_ACCESS_LOG, guard: ConnectionGuard | None = None
    ) -> None:
        self.metrics = metrics
        self.access = access
        self.guard = guard

    def wrap(self, handler: Handler, route: str, parts: Parts) -> Handler:
        """``handler`` in the wrapper of ``route`` (its template, what the metrics and log
        lines name: never the path, which may name a person), with ``parts``."""
        observe = self.metrics.requests.observe
        access, guard = self.access, self.guard
        add_cors, closes = parts.cors, parts.closes

        async def wrapper(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            rid = request_id(request)
            if guard is not None:
                guard.busy(request.protocol)
            token = CURRENT_REQUEST.set(RequestLog(rid))
            try:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    status = exc.status
                    raise  # a handler's own
                except Exception as exc:
                    response = unexpected(request, route, exc)
                else:
                    if add_cors:
                        response.headers.update(cors.HEADERS)
                # a refused body is always answered 4xx: only then is the flag looked up
                if closes and response.status >= 400 and request.get(CLOSE) and not response.prepared:
                    response.force_close()
                status = response.status
                response.headers["X-Request-ID"] = rid
                return response
            finally:
                seconds = time.perf_counter() - start
                observe(route, status, seconds)
                if access.wants(status):
                    log.info("request", method=request.method, route=route, status=status, ms=round(seconds * 1000, 3))
                CURRENT_REQUEST.reset(token)  # what the connection logs next is not this request's
                if guard is not None:
                    guard.idle(request.protocol)

        functools.update_wrapper(wrapper, handler)  # its name, its OpenAPI entry (``documented``)
        wrapper.parts = parts  # type: ignore[attr-defined]
        return wrapper

    def add_routes(self, router: web.UrlDispatcher, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Each of ``routes`` in its own wrapper (a GET's HEAD too, unless it says not), and
        a public resource's ``OPTIONS`` route, the preflight, once."""
        for route in routes:
            assert isinstance(route, web.RouteDef), route
            kwargs = dict(route.kwargs)
            allow_head = kwargs.pop("allow_head", True)
            resource = router.add_resource(route.path, name=kwargs.pop("name", None))
            template = resource.canonical
            methods = [route.method] + ([hdrs.METH_HEAD] if route.method == hdrs.METH_GET and allow_head else [])
            for method in methods:
                resource.add_route(method, self.wrap(route.handler, template, Parts.of(method, template)), **kwargs)
            if cors.is_public(template) and all(r.method != hdrs.METH_OPTIONS for r in resource):
                resource.add_route(hdrs.METH_OPTIONS, self.wrap(preflight, template, Parts()))

    def close(self, router: web.UrlDispatcher) -> None:
        """The router's last resource: what no route matched (``paths.Fallback``)."""
        router.register_resource(paths.Fallback(router, self.wrap(refused, UNMATCHED, Parts())))
