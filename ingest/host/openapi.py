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

from ingest.contract import bounds
from ingest.contract.fields import IDENT, NO_NUL
from ingest.edge import bodies, dub_shapes, refund, sale
from ingest.edge.routes import affitor, affixo, batch, biore, bricqs, dub, refport
from ingest.host import health
from ingest.manage.routes import bricqs as bricqs_manage
from ingest.manage.routes import commissions as C
from ingest.manage.routes import keys, links, privacy, reads, webhooks
from ingest.manage.routes import stats as S
from ingest.manage.routes._guard import ManageError

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
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: JSON schema
    extra: dict[str, Any] = field(default_factory=dict)


A, B, F, R, X = affitor.AffitorFailure, bricqs.BricqsError, affixo.AffixoError, refport.RefportError, biore.BioreError
DE = dub_shapes.DubError


def errors(model: Body, *codes: int) -> dict[int, Body]:
    return {code: model for code in codes}


# every route with a body: unreadable or past the bounds of client JSON (400:
# ingest.contract.bounds), too slow (408), too large (413), an encoding
# other than gzip, deflate or identity (415); every route: rate limited (429, Retry-After)
# and unavailable (503, Retry-After)
BODY = (400, 408, 413, 415)
MANAGE = errors(ManageError, 400, 401, 403, 404, 429, 503)
MANAGE_BODY = {**MANAGE, **errors(ManageError, *BODY)}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
DAY = {"type": "string", "format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}  # a UTC day, YYYY-MM-DD
CURRENCY = {"type": "string", "pattern": "^[a-z]{3}$"}  # ISO 4217, lower case
CUSTOMER = {"type": "string", "maxLength": 256, "pattern": IDENT}  # an external id
SEQ = {"type": "string", "pattern": "^[0-9]{1,18}$"}  # a ledger list's cursor
# a path's external id (ingest.contract.ids): normalized, or as given for a row stored before
# the rule; one that can name neither (empty, too long, a NUL) is the route's 400
PATH_PARAMS = {"external_id": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": NO_NUL}}

OPERATIONS: tuple[Op, ...] = (
    Op("get", "/healthz", "The process is up", "Operations", {200: health.Health}),
    Op("get", "/readyz", "Redis and Postgres answer", "Operations", {200: health.Ready, 503: health.Ready}),
    Op("get", "/openapi.json", "This document", "Operations", {200: None}),
    Op("get", "/metrics", "Prometheus metrics (text exposition format)", "Operations", {200: None}),
    Op("get", "/", "A plain page (the default fallback of redirect links)", "Browser", {200: None}),
    Op("get", "/tracker.js", "The tracker script a site owner pastes", "Browser", {200: None, 304: None}),
    Op(
        "get",
        "/r/{code}",
        "Redirect link: records the click, sets the cookie, 302 to the destination with the "
        "click id; unknown codes 302 to the fallback URL",
        "Browser",
        {302: None},
    ),
    Op(
        "post",
        "/api/v1/referral/click/{code}",
        "Track a referral click (bio.re, seed 000); no body (one sent "
        "anyway is capped: 413); an Origin the workspace does not allow: 403",
        "bio.re",
        {200: biore.BioreTrackResponse, **errors(X, 403, 429, 503, *BODY)},
    ),
    Op(
        "post",
        "/api/v1/referrals/generate",
        "Generate a referral code (Bricqs, seed 001)",
        "Bricqs",
        {200: bricqs_manage.BricqsGenerated, **errors(B, 401, 403, 404, 429, 503, *BODY)},
        bricqs_manage.BricqsGenerate,
        "apiKey",
    ),
    Op(
        "get",
        "/api/v1/referrals/validate/{code}",
        "Validate a referral code",
        "Bricqs",
        {200: bricqs.BricqsValidated, **errors(B, 429, 503)},
    ),
    Op(
        "post",
        "/api/v1/referrals/convert",
        "Convert a referral",
        "Bricqs",
        {200: bricqs.BricqsConverted, **errors(B, 403, 404, 429, 503, *BODY)},
        bodies.BricqsConvert,
    ),
    Op(
        "get",
        "/api/v1/referrals/stats/{participant_id}",
        "Referral statistics of a participant",
        "Bricqs",
        {200: bricqs_manage.BricqsStats, **errors(B, 401, 403, 404, 429, 503)},
        security="apiKey",
    ),
    Op(
        "post",
        "/api/v1/track/click",
        "Track an affiliate click (Affitor, seed 002)",
        "Affitor",
        {200: (affitor.AffitorClickResponse, affitor.AffitorTestModeResponse, A), **errors(A, 403, 429, 503, *BODY)},
        affitor.AffitorClick,
    ),
    Op(
        "post",
        "/v1/track/click",
        "Track a click, server to server (Affixo, seed 003)",
        "Affixo",
        {200: affixo.AffixoClickRecorded, **errors(F, 401, 403, 404, 429, 503, *BODY)},
        bodies.AffixoClick,
        "bearer",
    ),
    Op(
        "post",
        "/api/track/lead",
        "Track a lead (Refport, seed 004; Dub's API: its fields, modes and quantities, its SDKs)",
        "Refport",
        {200: refport.RefportLeadTracked, **errors(R, 401, 429, 503, *BODY)},
        bodies.TrackLead,
        "bearer",
    ),
    Op(
        "post",
        "/api/track/sale",
        "Track a sale (Refport): attributed to the customer's lead; an invoice counts "
        "once, a repeat answered as the first",
        "Refport",
        {200: refport.RefportSaleTracked, **errors(R, 401, 422, 429, 503, *BODY)},
        sale.TrackSale,
        "bearer",
    ),
    Op(
        "post",
        "/track/lead",
        "Track a lead (Dub's API, at its path): attributed to its click, or (clickId empty) to the customer's"
        " earlier one; mode deferred records the click for a later lead; eventQuantity counts it N times",
        "Dub",
        {200: dub_shapes.TrackLeadAnswer, **errors(DE, 401, 403, 404, 422, 429, 503, *BODY)},
        bodies.TrackLead,
        "bearer",
    ),
    Op(
        "post",
        "/track/sale",
        "Track a sale (Dub's API, at its path): attributed to the customer's lead; with clickId, tracked"
        " directly (the customer's lead made from the click); an invoice counts once",
        "Dub",
        {200: dub_shapes.TrackSaleAnswer, **errors(DE, 401, 403, 404, 422, 429, 503, *BODY)},
        sale.TrackSale,
        "bearer",
    ),
    Op(
        "post",
        "/track/click",
        "Track a click from a browser (Dub's API, at its path): the link by domain and key; allowed by the"
        " workspace's allowed hostnames (Origin, else Referer); a browser's repeat within the hour gets its"
        " first clickId",
        "Dub",
        {200: dub_shapes.TrackClickAnswer, **errors(DE, 403, 404, 422, 429, 503, *BODY)},
        dub.DubClick,
    ),
    Op(
        "post",
        "/api/track/refund",
        "Refund a sale (Refport), in full or in part: a row of its own, idempotent on "
        "its refundId (or Idempotency-Key), never past the sale's amount (409)",
        "Refport",
        {200: refund.RefundRecorded, **errors(R, 401, 404, 409, 422, 429, 503, *BODY)},
        refund.RefportRefund,
        "bearer",
    ),
    Op(
        "post",
        "/v1/track/conversion",
        "Track a conversion (a sale), server to server (Affixo): attributed to the "
        "customer's lead; an invoice counts once, a repeat answered as the first",
        "Affixo",
        {200: affixo.AffixoConversionRecorded, **errors(F, 401, 403, 422, 429, 503, *BODY)},
        sale.AffixoConversion,
        "bearer",
    ),
    Op(
        "post",
        "/v1/events/batch",
        "Up to 500 events in one request (JSON array or NDJSON, gzip accepted), each "
        "validated like its single-event route; one result per event, a bad event never fails the others",
        "Batch",
        {200: batch.BatchResult, **errors(ManageError, 401, 403, 429, 503, *BODY)},
        batch.BatchBody,
        "bearer",
    ),
    Op(
        "post",
        "/v1/programs",
        "Create a program",
        "Management",
        {201: links.Program, **MANAGE_BODY},
        links.NewProgram,
        "bearer",
    ),
    Op(
        "post",
        "/v1/affiliates",
        "Create an affiliate",
        "Management",
        {201: links.Affiliate, 409: ManageError, **MANAGE_BODY},
        links.NewAffiliate,
        "bearer",
    ),
    Op(
        "post",
        "/v1/links",
        "Create a link",
        "Management",
        {201: links.Link, 409: ManageError, **MANAGE_BODY},
        links.NewLink,
        "bearer",
    ),
    Op(
        "post",
        "/v1/keys",
        "Create an API key (scope *); the key is shown once",
        "Management",
        {201: keys.CreatedKey, **MANAGE_BODY},
        keys.NewKey,
        "bearer",
    ),
    Op(
        "delete",
        "/v1/keys/{prefix}",
        "Revoke an API key (scope *)",
        "Management",
        {200: keys.RevokedKey, **MANAGE},
        security="bearer",
    ),
    Op(
        "patch",
        "/v1/workspace",
        "Change the calling key's workspace: bot_policy (exclude | count), fraud_policy (per rule: flag | exclude)",
        "Management",
        {200: links.Workspace, **MANAGE_BODY},
        links.WorkspacePatch,
        "bearer",
    ),
    Op(
        "patch",
        "/v1/links/{id}",
        "Change a link's status or URL",
        "Management",
        {200: links.Link, **MANAGE_BODY},
        links.LinkPatch,
        "bearer",
    ),
    Op(
        "get",
        "/v1/links/{id}",
        "A link with its counters",
        "Management",
        {200: links.Link, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/links/{id}/stats",
        "A link's counted events, sales and revenue per currency, dropped events by "
        "reason and fraud flags by rule, "
        "per UTC day (from, to: YYYY-MM-DD, at most 366 days; default the last 30)",
        "Management",
        {200: S.LinkStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
    Op(
        "get",
        "/v1/conversions",
        "The workspace's sales, newest first: of a link, an affiliate or a customer "
        "(its external id); `before` is the `next` of the page before",
        "Management",
        {200: reads.SaleList, **MANAGE},
        security="bearer",
        query={
            "link_id": {"type": "string"},
            "affiliate_id": {"type": "string"},
            "customer_id": CUSTOMER,
            "before": {"type": "string"},
            "limit": LIMIT,
        },
    ),
    Op(
        "patch",
        "/v1/programs/{id}/commission",
        "Change a program's commission rules (the others kept): sale_bps, "
        "sale_flat (per currency), lead_flat, lead_currency, lead_events, duration (lifetime, months, first_sale), "
        "duration_months, hold_days",
        "Management",
        {200: C.ProgramCommission, **MANAGE_BODY},
        C.CommissionRules,
        "bearer",
    ),
    Op(
        "get",
        "/v1/commissions",
        "The commission ledger, newest first: by affiliate, program, status or currency; "
        "`before` is the `next` of the page before",
        "Management",
        {200: C.CommissionList, **MANAGE},
        security="bearer",
        query={
            "affiliate_id": {"type": "string"},
            "program_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/affiliate/commissions",
        "The calling affiliate's own commissions (an affiliate key)",
        "Affiliate",
        {200: C.CommissionList, **MANAGE},
        security="bearer",
        query={
            "program_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "post",
        "/v1/payouts",
        "A payout of an affiliate's approved, unpaid commissions in one currency (reversals "
        "included); 409 when they sum to nothing",
        "Management",
        {201: C.Payout, 409: ManageError, **MANAGE_BODY},
        C.NewPayout,
        "bearer",
    ),
    Op(
        "post",
        "/v1/payouts/{id}/paid",
        "Mark a payout, and its commissions, paid",
        "Management",
        {200: C.Payout, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/payouts",
        "Payouts, newest first: by affiliate, status or currency",
        "Management",
        {200: C.PayoutList, **MANAGE},
        security="bearer",
        query={
            "affiliate_id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/affiliate/payouts",
        "The calling affiliate's own payouts (an affiliate key)",
        "Affiliate",
        {200: C.PayoutList, **MANAGE},
        security="bearer",
        query={
            "status": {"type": "string", "enum": ["pending", "paid"]},
            "currency": CURRENCY,
            "before": SEQ,
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/stats",
        "The workspace's counted events, sales and revenue per currency, dropped events by "
        "reason (with those no link resolved for: unknown codes, sales credited to no affiliate) and fraud flags by "
        "rule, per UTC day (from, to as a link's)",
        "Management",
        {200: S.WorkspaceStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
    Op(
        "patch",
        "/v1/programs/{id}/fraud",
        "Change a program's fraud thresholds (burst_clicks, burst_seconds, fast_conversion_seconds)",
        "Management",
        {200: S.ProgramFraud, **MANAGE_BODY},
        S.FraudThresholds,
        "bearer",
    ),
    Op(
        "get",
        "/v1/events",
        "Recent events with their enrichment",
        "Management",
        {200: reads.EventList, **MANAGE},
        security="bearer",
        query={
            "link_id": {"type": "string"},
            "type": {"type": "string", "enum": ["click", "lead", "conversion"]},
            "limit": LIMIT,
        },
    ),
    Op(
        "get",
        "/v1/customers/{external_id}",
        "A customer by your external id",
        "Management",
        {200: reads.Customer, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/customers/{external_id}",
        "Erase a customer's personal data everywhere (scope erase, "
        "which * does not grant): Postgres at once, Redis and the archive by the workers; counters keep their "
        "numbers",
        "Management",
        {202: privacy.Erasure, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/affiliates/{id}",
        "Erase an affiliate's personal data everywhere (scope erase): name, email, "
        "external id and addresses; their links, commissions and payouts stay",
        "Management",
        {202: privacy.AffiliateErasures, **MANAGE},
        security="bearer",
    ),
    Op(
        "delete",
        "/v1/participants/{participant_id}",
        "Erase a Bricqs participant (the affiliate of that external id "
        "in every campaign) as an affiliate (scope erase)",
        "Management",
        {202: privacy.AffiliateErasures, **MANAGE},
        security="bearer",
    ),
    Op(
        "post",
        "/v1/suppressions",
        "Do not track a visitor, customer or address: their events are answered as "
        "usual, stored nowhere and counted as suppressed drops (the list keeps digests, never values); a workspace "
        "lists at most REFSTREAM_SUPPRESSION_MAX entries (409 limit_reached past it)",
        "Management",
        {201: privacy.Suppression, 409: ManageError, **MANAGE_BODY},
        privacy.NewSuppression,
        "bearer",
    ),
    Op(
        "get",
        "/v1/suppressions",
        "The workspace's do-not-track list (kinds and dates; no values), newest first, by page",
        "Management",
        {200: privacy.SuppressionList, **MANAGE},
        security="bearer",
        query={"before": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9a-f]{32}$"}, "limit": LIMIT},
    ),
    Op(
        "delete",
        "/v1/suppressions/{id}",
        "Track a listed visitor, customer or address again",
        "Management",
        {204: None, **MANAGE},
        security="bearer",
    ),
    Op(
        "get",
        "/v1/erasures/{id}",
        "An erasure: what is still pending, and its archive deadline (scope erase)",
        "Management",
        {200: privacy.Erasure, **MANAGE},
        security="bearer",
    ),
    Op(
        "post",
        "/v1/webhooks",
        "Create a webhook (lead.created, conversion.created, milestone.reached, "
        "fraud.flagged) to a public address; its signing secret is shown once",
        "Webhooks",
        {201: webhooks.Webhook, 409: ManageError, **MANAGE_BODY},
        webhooks.NewWebhook,
        "bearer",
    ),
    Op(
        "get",
        "/v1/webhooks/{id}/deliveries",
        "A webhook's deliveries with every attempt",
        "Webhooks",
        {200: webhooks.DeliveryList, **MANAGE},
        security="bearer",
        query={"limit": LIMIT},
    ),
    Op(
        "get",
        "/v1/affiliate/links",
        "The calling affiliate's links (affiliate key), newest first, by page",
        "Affiliate",
        {200: links.LinkList, **MANAGE},
        security="bearer",
        query={"before": {"type": "string", "format": "uuid"}, "limit": LIMIT},
    ),
    Op(
        "get",
        "/v1/affiliate/stats",
        "The calling affiliate's stats, its own links only: counted, dropped by "
        "reason, flagged by rule, sales, revenue, refunds and commission per currency, per UTC day (affiliate key;"
        " from, to as a link's stats)",
        "Affiliate",
        {200: S.AffiliateStats, **MANAGE},
        security="bearer",
        query={"from": DAY, "to": DAY},
    ),
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
