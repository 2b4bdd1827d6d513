"""``GET /openapi.json``: every route, its request and response models, from pydantic.

``OPERATIONS`` is the one list of documented routes, assembled here in the document's order
from the route tables beside this module (the host's own, one per dialect, the management
API's); a test checks that it and the app's router name the same routes, so neither can drift
from the other.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ingest.contract import bounds
from ingest.contract.fields import NO_NUL
from ingest.host.openapi import affitor, affixo, batch, biore, bricqs, dub, manage, operations, refport
from ingest.host.openapi.common import BODY, Body, Op, errors
from ingest.host.openapi.manage import CURRENCY, CUSTOMER, DAY, LIMIT, MANAGE, MANAGE_BODY, SEQ

__all__ = [
    "BODY",
    "CURRENCY",
    "CUSTOMER",
    "DAY",
    "LIMIT",
    "MANAGE",
    "MANAGE_BODY",
    "OPERATIONS",
    "PATH_PARAMS",
    "SEQ",
    "Body",
    "Op",
    "document",
    "errors",
    "openapi",
    "routes",
]

routes = web.RouteTableDef()

# a path's external id (ingest.contract.ids): normalized, or as given for a row stored before
# the rule; one that can name neither (empty, too long, a NUL) is the route's 400
PATH_PARAMS = {"external_id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": NO_NUL}}

# the document's order (its paths, and the models met first), kept as served when the routes
# shared one table: Refport's refund and Affixo's conversion after Dub's routes
OPERATIONS: tuple[Op, ...] = (
    *operations.OPERATIONS,
    *biore.OPERATIONS,
    *bricqs.OPERATIONS,
    *affitor.OPERATIONS,
    affixo.CLICK,
    refport.LEAD,
    refport.SALE,
    *dub.OPERATIONS,
    refport.REFUND,
    affixo.CONVERSION,
    *batch.OPERATIONS,
    *manage.OPERATIONS,
)


# idempotent by themselves: a conversion on (code, session), Dub's click per browser and link
_UNKEYED = frozenset({"/api/v1/referrals/convert", "/track/click"})
# keyed writes that change Postgres: a key is reserved while the first copy runs (409 meanwhile)
_RESERVED = frozenset({"/api/v1/referrals/generate"})
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


def _models() -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    for op in OPERATIONS:
        bodies = [op.request, *op.responses.values()]
        for body in bodies:
            for model in body if isinstance(body, tuple) else (body,):
                if model is not None:
                    seen[model.__name__] = model
    return list(seen.values())


def document() -> dict[str, Any]:
    models = _models()
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def content(body: Body) -> dict[str, Any]:
        if body is None:
            return {}
        schema = {"oneOf": [ref(m) for m in body]} if isinstance(body, tuple) else ref(body)
        return {"content": {"application/json": {"schema": schema}}}

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
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
        if op.method in ("post", "patch", "delete") and op.path not in _UNKEYED:
            params.append(_IDEMPOTENCY_KEY)
            error_body = op.responses.get(400, op.responses.get(401))
            responses.setdefault(422, error_body)  # idempotency_key_reused: the key with another request
            if op.path in _RESERVED or op.tag in ("Management", "Webhooks"):
                responses.setdefault(409, error_body)  # idempotency_in_progress: the first copy still runs
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "responses": {
                str(code): {"description": str(code), **(_UNAVAILABLE if code == 503 else {}), **content(body)}
                for code, body in responses.items()
            },
        }
        if params:
            operation["parameters"] = params
        if op.request is not None:
            operation["requestBody"] = {"required": True, **content(op.request)}
        if op.security:
            operation["security"] = [{op.security: []}]
        paths.setdefault(op.path, {})[op.method] = operation
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
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Workspace or affiliate API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(document()), content_type="application/json")
