"""``GET /openapi.json``: every route the app serves, its request and response models, from pydantic.

Each route's entry is declared at its handler (``ingest.edge.documented``: ``@documented``
under the route's decorator), in the module that serves it; this module only collects them
from the app's router (``operations``), the method and path the router's, and renders the
document. A route without an entry fails the document (``DocumentError``), so the document
and the router name the same routes by construction. ``HEAD`` routes are not listed: each
is its ``GET``'s, answered without a body; nor are the preflights, the ``OPTIONS`` routes of
the public resources.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ingest.contract import bounds
from ingest.contract.errors import Misconfigured
from ingest.contract.fields import NO_NUL
from ingest.edge.documented import Body, Op, doc_of, documented
from ingest.host import paths

__all__ = ["PATH_PARAMS", "DocumentError", "document", "openapi", "operations", "routes"]

routes = web.RouteTableDef()

# a path's external id (ingest.contract.ids): normalized, or as given for a row stored before
# the rule; one that can name neither (empty, too long, a NUL) is the route's 400
PATH_PARAMS = {"external_id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": NO_NUL}}


class DocumentError(Misconfigured):
    """The entries cannot make the document: a route served whose handler carries no
    ``@documented`` entry, or two models of one name (they would share a schema)."""


def operations(app: web.Application) -> tuple[Op, ...]:
    """Every route ``app`` serves, in the router's order, with its handler's entry; not a
    ``GET``'s ``HEAD``, a public route's preflight (its ``OPTIONS``: ``ingest.host.wrap``)
    nor the router's last resource, what no route matched (``paths.Fallback``)."""
    found: list[Op] = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS") or isinstance(route.resource, paths.Fallback):
            continue
        assert route.resource is not None  # every route the app adds is a resource's
        path = route.resource.canonical
        doc = doc_of(route.handler)
        if doc is None:
            raise DocumentError(f"{route.method} {path}: its handler has no @documented entry")
        found.append(Op.of(route.method, path, doc))
    return tuple(found)


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
    "description": "A repeat within REFSTREAM_IDEMPOTENCY_WINDOW_S gets the first answer and changes nothing;"
    " the same key with another body: 422",
}
# a 503 is a refusal (nothing stored, a retry is safe) unless it says its event may be stored
_UNAVAILABLE = {
    "description": "Unavailable: refused, nothing was stored, retry after Retry-After; except with"
    " Refstream-Outcome: unknown, whose event may be stored (retry with the same Idempotency-Key to count once)",
    "headers": {
        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"},
        "Refstream-Outcome": {
            "schema": {"type": "string", "enum": ["unknown"]},
            "description": "present when the event may be stored",
        },
        "Refstream-Event-Id": {
            "schema": {"type": "string", "format": "uuid"},
            "description": "the event that may be stored",
        },
    },
}


def _models(ops: tuple[Op, ...]) -> list[type[BaseModel]]:
    """Every model the operations name, once; two models of one name would share a schema."""
    seen: dict[str, type[BaseModel]] = {}
    for op in ops:
        for body in (op.request, *op.responses.values()):
            for model in body if isinstance(body, tuple) else (body,):
                if model is None:
                    continue
                if seen.setdefault(model.__name__, model) is not model:
                    raise DocumentError(f"two models named {model.__name__}: {seen[model.__name__]!r}, {model!r}")
    return list(seen.values())


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _content(body: Body) -> dict[str, Any]:
    if body is None:
        return {}
    schema = {"oneOf": [_ref(m) for m in body]} if isinstance(body, tuple) else _ref(body)
    return {"content": {"application/json": {"schema": schema}}}


def _operation(op: Op) -> dict[str, Any]:
    """One operation of the document: its parameters, request body and responses."""
    params = [
        {
            "name": seg[1:-1],
            "in": "path",
            "required": True,
            "schema": PATH_PARAMS.get(seg[1:-1], {"type": "string"}),
        }
        for seg in op.path.split("/")
        if seg.startswith("{")
    ] + [{"name": q, "in": "query", "required": False, "schema": schema} for q, schema in op.query.items()]
    responses = dict(op.responses)
    if op.method in ("post", "patch", "delete") and not op.idempotent:
        params.append(_IDEMPOTENCY_KEY)
        error_body = op.responses.get(400, op.responses.get(401))
        responses.setdefault(422, error_body)  # idempotency_key_reused: the key with another request
        # keyed writes that change Postgres (the management API's all do): a key is reserved
        # while the first copy runs
        if op.reserves or op.tag in ("Management", "Webhooks"):
            responses.setdefault(409, error_body)  # idempotency_in_progress: the first copy still runs
    operation: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {
            str(code): {"description": str(code), **(_UNAVAILABLE if code == 503 else {}), **_content(body)}
            for code, body in responses.items()
        },
    }
    if params:
        operation["parameters"] = params
    if op.request is not None:
        operation["requestBody"] = {"required": True, **_content(op.request)}
    if op.security:
        operation["security"] = [{op.security: []}]
    return operation


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``app`` serves."""
    ops = operations(app)
    models = _models(ops)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "refstream",
            "version": "0.1.0",
            "description": "Referral and affiliate event ingestion: six dialects, one pipeline. A JSON body"
            f" (and each batch item) nests at most {bounds.MAX_DEPTH} levels and holds at most"
            f" {bounds.MAX_VALUES} values: 400 past them.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Workspace or affiliate API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


@routes.get("/openapi.json")
@documented("This document", "Operations", {200: None})
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(document(request.app)), content_type="application/json")
