"""``GET /openapi.json``: every route, its request and response models, from pydantic.

``OPERATIONS`` is the one list of documented routes; a test checks that it and the app's
router name the same routes, so neither can drift from the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .routes import affitor, affixo, batch, biore, bricqs, health, manage, refport, webhooks
from .routes import stats as S

routes = web.RouteTableDef()

Body = type[BaseModel] | tuple[type[BaseModel], ...] | None


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int, Body]
    request: type[BaseModel] | None = None
    security: str | None = None  # "bearer" | "apiKey" | None (public)
    query: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


M = manage
_MANAGE_ERRORS: dict[int, Body] = {400: M.ManageError, 401: M.ManageError, 403: M.ManageError, 404: M.ManageError}

OPERATIONS: tuple[Op, ...] = (
    Op("get", "/healthz", "The process is up", "Operations", {200: health.Health}),
    Op("get", "/readyz", "Redis and Postgres answer", "Operations", {200: health.Ready, 503: health.Ready}),
    Op("get", "/openapi.json", "This document", "Operations", {200: None}),
    Op("get", "/metrics", "Prometheus metrics (text exposition format)", "Operations", {200: None}),
    Op("get", "/", "A plain page (the default fallback of redirect links)", "Browser", {200: None}),
    Op("get", "/tracker.js", "The tracker script a site owner pastes", "Browser", {200: None, 304: None}),
    Op("get", "/r/{code}", "Redirect link: records the click, sets the cookie, 302 to the destination with the "
       "click id; unknown codes 302 to the fallback URL", "Browser", {302: None}),
    Op("post", "/api/v1/referral/click/{code}", "Track a referral click (bio.re, seed 000)", "bio.re",
       {200: biore.BioreTrackResponse, 429: biore.BioreError, 503: biore.BioreError}),
    Op("post", "/api/v1/referrals/generate", "Generate a referral code (Bricqs, seed 001)", "Bricqs",
       {200: bricqs.BricqsGenerated, 400: bricqs.BricqsError, 401: bricqs.BricqsError, 403: bricqs.BricqsError,
        404: bricqs.BricqsError, 429: bricqs.BricqsError}, bricqs.BricqsGenerate, "apiKey"),
    Op("get", "/api/v1/referrals/validate/{code}", "Validate a referral code", "Bricqs",
       {200: bricqs.BricqsValidated, 429: bricqs.BricqsError}),
    Op("post", "/api/v1/referrals/convert", "Convert a referral", "Bricqs",
       {200: bricqs.BricqsConverted, 400: bricqs.BricqsError, 404: bricqs.BricqsError, 429: bricqs.BricqsError},
       bricqs.BricqsConvert),
    Op("get", "/api/v1/referrals/stats/{participant_id}", "Referral statistics of a participant", "Bricqs",
       {200: bricqs.BricqsStats, 401: bricqs.BricqsError, 403: bricqs.BricqsError, 404: bricqs.BricqsError},
       security="apiKey"),
    Op("post", "/api/v1/track/click", "Track an affiliate click (Affitor, seed 002)", "Affitor",
       {200: (affitor.AffitorClickResponse, affitor.AffitorTestModeResponse, affitor.AffitorFailure),
        400: affitor.AffitorFailure, 413: affitor.AffitorFailure, 429: affitor.AffitorFailure},
       affitor.AffitorClick),
    Op("post", "/v1/track/click", "Track a click, server to server (Affixo, seed 003)", "Affixo",
       {200: affixo.AffixoClickRecorded, 400: affixo.AffixoError, 401: affixo.AffixoError,
        403: affixo.AffixoError, 404: affixo.AffixoError, 429: affixo.AffixoError},
       affixo.AffixoClick, "bearer"),
    Op("post", "/api/track/lead", "Track a lead (Refport, seed 004)", "Refport",
       {200: refport.RefportLeadTracked, 400: refport.RefportError, 401: refport.RefportError,
        429: refport.RefportError}, refport.RefportLead, "bearer"),
    Op("post", "/v1/events/batch", "Up to 500 events in one request (JSON array or NDJSON, gzip accepted), each "
       "validated like its single-event route; one result per event", "Batch",
       {200: batch.BatchResult, 400: M.ManageError, 401: M.ManageError, 403: M.ManageError, 413: M.ManageError,
        429: M.ManageError}, batch.BatchBody, "bearer"),
    Op("post", "/v1/programs", "Create a program", "Management", {201: M.Program, **_MANAGE_ERRORS},
       M.NewProgram, "bearer"),
    Op("post", "/v1/affiliates", "Create an affiliate", "Management",
       {201: M.Affiliate, 409: M.ManageError, **_MANAGE_ERRORS}, M.NewAffiliate, "bearer"),
    Op("post", "/v1/links", "Create a link", "Management", {201: M.Link, 409: M.ManageError, **_MANAGE_ERRORS},
       M.NewLink, "bearer"),
    Op("post", "/v1/keys", "Create an API key (scope *); the key is shown once", "Management",
       {201: M.CreatedKey, **_MANAGE_ERRORS}, M.NewKey, "bearer"),
    Op("delete", "/v1/keys/{prefix}", "Revoke an API key (scope *)", "Management",
       {200: M.RevokedKey, **_MANAGE_ERRORS}, security="bearer"),
    Op("patch", "/v1/workspace", "Change the calling key's workspace: bot_policy (exclude | count), fraud_policy "
       "(per rule: flag | exclude)", "Management",
       {200: M.Workspace, **_MANAGE_ERRORS}, M.WorkspacePatch, "bearer"),
    Op("patch", "/v1/links/{id}", "Change a link's status or URL", "Management", {200: M.Link, **_MANAGE_ERRORS},
       M.LinkPatch, "bearer"),
    Op("get", "/v1/links/{id}", "A link with its counters", "Management", {200: M.Link, **_MANAGE_ERRORS},
       security="bearer"),
    Op("get", "/v1/links/{id}/stats", "A link's counted events, dropped events by reason and fraud flags by rule, "
       "per UTC day (from, to: YYYY-MM-DD, at most 366 days; default the last 30)", "Management",
       {200: M.LinkStats, **_MANAGE_ERRORS}, security="bearer", query=("from", "to")),
    Op("patch", "/v1/programs/{id}/fraud", "Change a program's fraud thresholds (burst_clicks, burst_seconds, "
       "fast_conversion_seconds)", "Management", {200: S.ProgramFraud, **_MANAGE_ERRORS}, S.FraudThresholds,
       "bearer"),
    Op("get", "/v1/events", "Recent events with their enrichment", "Management",
       {200: M.EventList, **_MANAGE_ERRORS}, security="bearer", query=("link_id", "type", "limit")),
    Op("get", "/v1/customers/{external_id}", "A customer by your external id", "Management",
       {200: M.Customer, **_MANAGE_ERRORS}, security="bearer"),
    Op("post", "/v1/webhooks", "Create a webhook (lead.created, conversion.created, milestone.reached, "
       "fraud.flagged); its signing secret is shown once", "Webhooks",
       {201: webhooks.Webhook, 409: M.ManageError, 503: M.ManageError, **_MANAGE_ERRORS}, webhooks.NewWebhook,
       "bearer"),
    Op("get", "/v1/webhooks/{id}/deliveries", "A webhook's deliveries with every attempt", "Webhooks",
       {200: webhooks.DeliveryList, **_MANAGE_ERRORS}, security="bearer", query=("limit",)),
    Op("get", "/v1/affiliate/links", "The calling affiliate's links (affiliate key)", "Affiliate",
       {200: M.LinkList, **_MANAGE_ERRORS}, security="bearer"),
    Op("get", "/v1/affiliate/stats", "The calling affiliate's stats, its own links only: counted, dropped by "
       "reason, flagged by rule, per UTC day (affiliate key)", "Affiliate",
       {200: M.AffiliateStats, **_MANAGE_ERRORS}, security="bearer", query=("from", "to")),
)  # fmt: skip


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
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in op.path.split("/")
            if seg.startswith("{")
        ] + [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in op.query]
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "responses": {
                str(code): {"description": str(code), **content(body)} for code, body in op.responses.items()
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
        "info": {"title": "refstream", "version": "0.1.0",
                 "description": "Referral and affiliate event ingestion: five dialects, one pipeline."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Workspace or affiliate API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }  # fmt: skip


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(document()), content_type="application/json")
