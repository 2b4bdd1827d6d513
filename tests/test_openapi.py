"""/openapi.json describes exactly the routes the app serves (each route's entry declared at
its handler, collected from the app's router), is a valid OpenAPI 3.1 document, and no body
thrown at any route gets a 5xx."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from pydantic import BaseModel

from ingest.contract.settings import Settings
from ingest.edge.documented import BODY, doc_of, documented, errors
from ingest.edge.problem import ManageError
from ingest.host import paths
from ingest.host.app import create_app
from ingest.host.openapi import DocumentError, document, operations

from ._openapi import OPERATIONS
from ._world import World, call


async def test_the_document_names_exactly_the_served_routes(edge: str, settings: Settings):
    status, spec, _ = await call("GET", f"{edge}/openapi.json")
    assert status == 200
    validate(spec)
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    app = create_app(settings)
    served: set[tuple[str, str]] = set()
    for r in app.router.routes():
        # not documented: a GET's HEAD, a public route's preflight (tests/test_cors.py holds
        # it to the document), and the router's last resource, what no route matched
        if r.method not in ("HEAD", "OPTIONS") and not isinstance(r.resource, paths.Fallback):
            assert r.resource is not None  # every route the app adds is a resource's
            served.add((r.method, r.resource.canonical))
    assert documented == served
    # request models carry their caps
    assert spec["components"]["schemas"]["AffixoClick"]["properties"]["ref"]["maxLength"] == 128
    assert set(spec["components"]["schemas"]["BatchLeadItem"]["required"]) == {
        "type",
        "clickId",
        "eventName",
        "customerExternalId",
    }
    # Dub's lead: the customer by any of its names, the click empty for a deferred one's
    assert set(spec["components"]["schemas"]["TrackLead"]["required"]) == {"eventName"}


def _served(app: web.Application) -> list[tuple[str, str]]:
    # not operations: a GET's HEAD, a public route's preflight, what no route matched
    return [
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method not in ("HEAD", "OPTIONS") and r.resource and not isinstance(r.resource, paths.Fallback)
    ]


def test_every_served_route_carries_its_entry(settings: Settings) -> None:
    # the entries are collected from the router: one per route the app serves, each its
    # handler's own, and no route twice
    app = create_app(settings)
    ops = operations(app)
    served = _served(app)
    assert [(op.method.upper(), op.path) for op in ops] == served
    assert len(set(served)) == len(served)
    handlers = {(r.method, r.resource.canonical): r.handler for r in app.router.routes() if r.resource}
    for op in ops:
        doc = doc_of(handlers[(op.method.upper(), op.path)])
        assert doc is not None and (doc.summary, doc.responses, doc.request) == (op.summary, op.responses, op.request)


def test_a_route_without_an_entry_fails_the_document() -> None:
    routes = web.RouteTableDef()

    @routes.post("/v1/documented")
    @documented("Documented", "Management", {200: ManageError, **errors(ManageError, *BODY)}, ManageError, "bearer")
    async def documented_route(request: web.Request) -> web.Response:
        return web.Response()

    @routes.get("/v1/forgotten")
    async def forgotten(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.add_routes(routes)
    with pytest.raises(DocumentError, match="GET /v1/forgotten"):
        document(app)
    served = web.Application()
    served.router.add_post("/v1/documented", documented_route)
    spec = document(served)
    validate(spec)
    assert list(spec["paths"]) == ["/v1/documented"]
    assert {"400", "408", "413", "415", "422", "409"} <= set(spec["paths"]["/v1/documented"]["post"]["responses"])


def _twin() -> type[BaseModel]:
    class Twin(BaseModel):
        value: int

    return Twin


def test_two_models_of_one_name_fail_the_document() -> None:
    # the document names a model's schema by its class name: a second of the same name would
    # silently take the first's place
    app = web.Application()
    for path in ("/v1/one", "/v1/other"):

        @documented("A twin", "Management", {200: _twin()}, security="bearer")
        async def route(request: web.Request) -> web.Response:
            return web.Response()

        app.router.add_get(path, route, allow_head=False)
    with pytest.raises(DocumentError, match="two models named Twin"):
        document(app)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=15), inner, max_size=5),
    max_leaves=15,
)
FIELDS = sorted({name for op in OPERATIONS if op.request for name in op.request.model_fields})
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(orjson.dumps),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(orjson.dumps),
)
WRITES = [op for op in OPERATIONS if op.method in ("post", "patch")]


async def test_no_body_gets_a_5xx(edge: str, world: World):
    paths = [op.path.replace("{code}", "PARTNER123").replace("{id}", world.link["id"]) for op in WRITES]
    headers = {"Authorization": f"Bearer {world.api_key}", "X-API-Key": world.api_key}
    seen: list[int] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies)
    def fuzz(body: bytes) -> None:
        async def one() -> None:
            for op, path in zip(WRITES, paths, strict=True):
                status, _, _ = await call(op.method.upper(), f"{edge}{path}", data=body, headers=headers)
                assert status < 500, (op.path, body)
                seen.append(status)

        asyncio.run_coroutine_threadsafe(one(), loop).result()

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(fuzz)
    assert 400 in seen and 200 in seen  # both refusals and acceptances were exercised


def _body_schema(spec: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    """The request body's schema of one operation, its references resolvable."""
    op = spec["paths"][path][method]
    return {**op["requestBody"]["content"]["application/json"]["schema"], "components": spec["components"]}


# Bodies the routes refuse that an earlier document allowed (schemathesis at length found
# them): a sale_flat key that is no currency code, an amount below 0, a customer's value
# holding a control character. For each, the document now forbids what the route refuses,
# and still allows what the route takes.
REFUSED_AND_TAKEN = [
    ("/v1/programs/{id}/commission", "patch", {"sale_flat": {"\u00a2\u0084": 455}}, {"sale_flat": {"usd": 455}}),
    ("/v1/programs/{id}/commission", "patch", {"sale_flat": {"usd": -455}}, {"sale_flat": {"eur": 0}}),
    (
        "/v1/suppressions",
        "post",
        {"kind": "customer", "value": "\u00b3\r5"},
        {"kind": "customer", "value": " \u00b35 "},
    ),
    ("/v1/suppressions", "post", {"kind": "customer", "value": "a\u200bb"}, {"kind": "visitor", "value": "a\rb"}),
]


async def test_what_a_route_refuses_the_document_forbids(edge: str, world: World):
    _, spec, _ = await call("GET", f"{edge}/openapi.json")
    headers = {"Authorization": f"Bearer {world.api_key}"}
    for path, method, refused, taken in REFUSED_AND_TAKEN:
        schema = Draft202012Validator(_body_schema(spec, path, method))
        url = f"{edge}{path.replace('{id}', world.program_id)}"
        assert not schema.is_valid(refused), (path, refused)
        status, body, _ = await call(method.upper(), url, json=refused, headers=headers)
        assert status == 400, (path, refused, status, body)
        assert schema.is_valid(taken), (path, taken)
        status, body, _ = await call(method.upper(), url, json=taken, headers=headers)
        assert status in (200, 201), (path, taken, status, body)
