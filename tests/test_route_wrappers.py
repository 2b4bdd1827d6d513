"""Each route is served in a wrapper of its own, assembled when it is registered from the
parts its kind needs (issue 66 decision 1), as each route is the list of its steps
(``tests/test_route_steps.py``). Held here on the app ``create_app`` builds: one wrapper's
code for every route (each part one implementation), the CORS headers on a public route's
answers and on no other's, an ``OPTIONS`` route (the preflight) where a route answers
browsers and nowhere else, the close of a refused body on the routes that read one, and
what no route matches in the router's last resource."""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web

from ingest.contract.settings import Settings
from ingest.host import cors, paths
from ingest.host.app import create_app
from ingest.host.wrap import Parts, preflight, refused

# a route of each kind, with the parts it must hold
EXPECTED = {
    ("POST", "/api/v1/track/click"): Parts(cors=True, closes=True),  # public, a body: Affitor's click
    ("POST", "/api/v1/referral/click/{code}"): Parts(cors=True, closes=True),  # Bio.re's click
    ("GET", "/r/{code}"): Parts(cors=True),  # public, no body: the redirect
    ("HEAD", "/r/{code}"): Parts(cors=True),
    ("GET", "/tracker.js"): Parts(cors=True),
    ("POST", "/api/track/sale"): Parts(closes=True),  # keyed, server to server: Refport's sale
    ("POST", "/v1/events/batch"): Parts(closes=True),
    ("PATCH", "/v1/links/{id}"): Parts(closes=True),  # the management API
    ("GET", "/v1/events"): Parts(),
    ("DELETE", "/v1/customers/{external_id}"): Parts(),
    ("GET", "/healthz"): Parts(),
    ("GET", "/metrics"): Parts(),
    ("OPTIONS", "/api/v1/track/click"): Parts(),  # the preflight says its own headers
}


def _app() -> web.Application:
    return create_app(Settings())


def test_each_route_holds_the_parts_its_kind_needs_and_no_other() -> None:
    app = _app()
    held: dict[tuple[str, str], Parts] = {}
    code: Any = None
    public: set[str] = set()
    preflights: set[str] = set()
    for route in app.router.routes():
        assert route.resource is not None
        if isinstance(route.resource, paths.Fallback):
            continue
        template = route.resource.canonical
        wrapper: Any = route.handler
        code = code or wrapper.__code__
        assert wrapper.__code__ is code, (route.method, template)  # one wrapper, every part once
        parts: Parts = wrapper.parts
        held[(route.method, template)] = parts
        if route.method == hdrs.METH_OPTIONS:
            assert wrapper.__wrapped__ is preflight and parts == Parts(), template
            preflights.add(template)
            continue
        assert wrapper.__wrapped__ is not preflight
        assert parts.cors == cors.is_public(template), (route.method, template)
        assert parts.closes == (route.method in {"POST", "PUT", "PATCH"}), (route.method, template)
        if parts.cors:
            public.add(template)
    # a preflight where a route answers browsers, and nowhere else
    assert preflights == public
    assert {"/api/v1/track/click", "/track/click", "/api/v1/referrals/convert", "/r/{code}"} <= public
    for route_key, parts in EXPECTED.items():
        assert held[route_key] == parts, route_key


def test_what_no_route_matches_is_the_routers_last_resource() -> None:
    app = _app()
    resources = list(app.router.resources())
    fallback = resources[-1]
    assert isinstance(fallback, paths.Fallback)
    assert [r for r in resources if isinstance(r, paths.Fallback)] == [fallback]
    wrapper: Any = fallback.refused
    assert wrapper.__wrapped__ is refused and wrapper.parts == Parts()


def test_a_wrapper_is_the_route_modules_own_handler_inside() -> None:
    from ingest.edge.routes import affitor, refport

    app = _app()
    inside = {}
    for r in app.router.routes():
        if r.resource is not None:
            inside[(r.method, r.resource.canonical)] = getattr(r.handler, "__wrapped__", None)
    for module in (affitor, refport):
        for route in module.routes:
            assert isinstance(route, web.RouteDef)
            assert inside[(route.method, route.path)] is route.handler
