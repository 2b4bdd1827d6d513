"""The management API, ``/v1``: JSON, ``Authorization: Bearer`` workspace key, scope
``write`` for changes and ``read`` for reads, everything scoped to the key's workspace.
Affiliate keys (read-only) reach ``/v1/affiliate/*`` and see only their own links and stats.
Errors: ``{"error": code, "detail": text}``, as the Affixo API (seed 003) answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from .. import admin, manage, stats
from ..admin import NotFound
from ..auth import Principal, bearer
from ..body import BodyError, parse, plain, read
from ..body import code as body_code
from ..connections import PG_ERRORS, REDIS_ERRORS
from ..fields import Ident, Integer, Text, Url
from ..idempotency import Claim, InvalidKey, header_key, request_claim
from ..lookup import Unavailable, lookup
from ..state import EDGE, Edge

routes = web.RouteTableDef()


class NewMilestone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=200)
    threshold: Integer = Field(ge=1, le=1_000_000, description="Conversions an affiliate needs to reach it")


class NewProgram(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=200)
    url: Url | None = Field(None, max_length=2048)
    cookie_window_days: Integer = Field(30, ge=1, le=3650)
    attribution: Literal["first_click", "last_click"] = "last_click"
    milestones: list[NewMilestone] = Field(default_factory=list, max_length=50)


class NewAffiliate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    program_id: Ident = Field(max_length=64)
    external_id: Ident = Field(min_length=1, max_length=256)
    name: Text | None = Field(None, max_length=256)
    email: Ident | None = Field(None, max_length=320)


class NewLink(BaseModel):
    model_config = ConfigDict(extra="forbid")
    affiliate_id: Ident = Field(max_length=64)
    code: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    url: Url = Field(min_length=1, max_length=2048)
    domain: str | None = Field(None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")
    status: Literal["active", "inactive"] = "active"


Scope = Literal["read", "write", "track", "*"]
FraudRule = Literal["self_referral", "affiliate_ip", "click_burst", "fast_conversion", "disposable_email"]


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["track"]), max_length=4)
    affiliate_id: Ident | None = Field(None, max_length=64, description="A read-only key for this affiliate")
    name: Text | None = Field(None, max_length=200)


class CreatedKey(BaseModel):
    api_key: str = Field(description="Shown once; only its sha256 is stored")
    prefix: str
    kind: str
    scopes: list[str]


class RevokedKey(BaseModel):
    revoked: str


class WorkspacePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bot_policy: Literal["exclude", "count"] | None = Field(
        None,
        description="exclude (the default): bots' clicks are counted apart, in bot_clicks only; count: as clicks too"
        " (unique clicks included), as bio.re counts them. Either way the event is flagged is_bot. Applies to the"
        " clicks the workers store from then on.",
    )
    fraud_policy: dict[FraudRule, Literal["flag", "exclude"]] | None = Field(
        None,
        description="Per fraud rule: flag (the default: the event is flagged and still counts) or exclude (flagged,"
        " and it moves no counter and credits no affiliate). Rules not given keep their policy.",
    )


class Workspace(BaseModel):
    id: str
    name: str
    ip_policy: str
    bot_policy: str
    fraud_policy: dict[str, str]
    allowed_origins: list[str]
    created_at: str


class LinkPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["active", "inactive"] | None = None
    url: Url | None = Field(None, min_length=1, max_length=2048)


class Program(BaseModel):
    id: str
    workspace_id: str
    name: str
    url: str | None
    cookie_window_days: int
    attribution: str
    created_at: str
    milestones: list[NewMilestone]


class Affiliate(BaseModel):
    id: str
    workspace_id: str
    program_id: str
    external_id: str
    name: str | None
    email: str | None
    created_at: str


class Link(BaseModel):
    id: str
    workspace_id: str
    program_id: str | None
    affiliate_id: str | None
    code: str
    url: str
    domain: str | None
    status: str
    clicks: int
    unique_clicks: int
    bot_clicks: int
    leads: int
    conversions: int
    last_clicked_at: str | None
    created_at: str
    updated_at: str


class LinkList(BaseModel):
    data: list[Link]


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    event_id: str
    type: Literal["click", "lead", "conversion"]
    link_id: str | None
    received_at: str
    payload: dict[str, Any]


class EventList(BaseModel):
    data: list[Event]


class Customer(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    external_id: str | None
    visitor_id: str
    status: Literal["click", "lead", "converted"]


class DailyStats(BaseModel):
    day: str = Field(description="A UTC day (YYYY-MM-DD); in totals, absent")
    clicks: int
    unique_clicks: int
    bot_clicks: int
    leads: int
    conversions: int
    dropped: dict[str, int] = Field(
        description="Events not counted, by reason: bot, unknown_code, inactive_link, rate_limited, out_of_window,"
        " test_mode, duplicate, invalid, fraud (excluded by the fraud policy)"
    )
    dropped_detail: dict[str, dict[str, int]] = Field(description="By reason, by detail: a bot's sub-reason, a rule")
    flagged: dict[str, int] = Field(description="Fraud flags by rule, whether the event was counted or excluded")


class StatsTotals(BaseModel):
    clicks: int
    unique_clicks: int
    bot_clicks: int
    leads: int
    conversions: int
    dropped: dict[str, int]
    dropped_detail: dict[str, dict[str, int]]
    flagged: dict[str, int]


class LinkStats(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    link_id: str
    from_: str = Field(alias="from", description="First UTC day (default: 29 days before to)")
    to: str = Field(description="Last UTC day (default: today)")
    totals: StatsTotals
    daily: list[DailyStats] = Field(description="Days with anything in them, in order")


class AffiliateStats(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    affiliate_id: str
    links: int
    clicks: int = Field(description="The affiliate's links' counters now (all time)")
    unique_clicks: int
    leads: int
    conversions: int
    from_: str = Field(alias="from")
    to: str
    totals: StatsTotals = Field(description="Over from..to")
    daily: list[DailyStats]


class ManageError(BaseModel):
    error: str
    detail: str | None = None
    need: str | None = None


def json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error(status: int, code: str, detail: str | None = None, **extra: str) -> web.Response:
    return json(status, {"error": code, **({"detail": detail} if detail else {}), **extra})


def segment(request: web.Request, name: str) -> str:
    """A path segment to look up; one no row can hold (control characters, NUL) is not found."""
    value = request.match_info[name]
    if not plain(value, 256):
        raise NotFound(f"{name} not found")
    return value


def limit_param(request: web.Request, default: int = 50, most: int = 500) -> int | web.Response:
    """``?limit=``: digits only (the document says integer), 1 to ``most``."""
    given = request.query.get("limit")
    if given is None:
        return default
    if not (given.isascii() and given.isdigit()):
        return error(400, "invalid_request", "limit: an integer")
    if not 1 <= int(given) <= most:
        return error(400, "invalid_request", f"limit: between 1 and {most}")
    return int(given)


Handler = Callable[[web.Request, Edge, Principal], Awaitable[web.Response]]
WRITES = frozenset({"POST", "PATCH", "DELETE"})  # these honour Idempotency-Key


async def _claim(request: web.Request, key: str, workspace: str) -> Claim:
    raw = await read(request)  # kept on the request: the handler's parse reads it again for free
    return request_claim(request, key, workspace, raw)


def guarded(
    scope: str, *, affiliate: bool = False
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.Response]]]:
    """Bearer key, kind, scope and the per-key rate limit; then the handler, with the
    errors of the data layer turned into this API's shapes."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def route(request: web.Request) -> web.Response:
            edge = request.app[EDGE]
            secret = bearer(request.headers.get("Authorization"))
            if secret is None:
                return error(401, "unauthorized")
            try:
                found = await lookup(edge, edge.key_limiter, "", secret=secret)
            except (Unavailable, *REDIS_ERRORS):
                return json(503, {"error": "unavailable"}, {"Retry-After": "1"})
            principal = found.principal
            if principal is None:
                return error(401, "unauthorized")
            if (principal.kind == "affiliate") != affiliate:
                return error(403, "insufficient_scope", need="affiliate key" if affiliate else "workspace key")
            if not principal.allows(scope):
                return error(403, "insufficient_scope", need=scope)
            if not found.verdict.allowed:
                return json(429, {"error": "rate_limited"}, found.verdict.headers)
            caller: Principal = principal
            try:
                idem_key = header_key(request) if request.method in WRITES else None
            except InvalidKey as exc:
                return error(400, "invalid_idempotency_key", str(exc))

            async def run() -> web.Response:
                try:
                    if caller.affiliate_id is not None:  # where the affiliate's own actions come from
                        async with edge.pg.acquire() as conn:
                            await stats.affiliate_seen(conn, caller.affiliate_id, edge.client_ip(request))
                    return await handler(request, edge, caller)
                except BodyError as exc:
                    return error(exc.status, body_code(exc), exc.message)
                except NotFound as exc:
                    return error(404, "not_found", str(exc))
                except manage.Conflict as exc:
                    return error(409, "conflict", str(exc))
                except (*PG_ERRORS, *REDIS_ERRORS):
                    return json(503, {"error": "unavailable"}, {"Retry-After": "1"})

            if idem_key is None:
                return await run()
            assert secret is not None
            try:
                claim = await _claim(request, idem_key, caller.workspace_id)
                return await edge.idem.once(edge.batcher, claim, secret, idem_key, run, lambda s, c, m: error(s, c, m))
            except BodyError as exc:
                return error(exc.status, body_code(exc), exc.message)
            except REDIS_ERRORS:
                return json(503, {"error": "unavailable"}, {"Retry-After": "1"})

        return route

    return wrap


@routes.post("/v1/programs")
@guarded("write")
async def create_program(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewProgram)
    async with edge.pg.acquire() as conn:
        return json(201, await manage.create_program(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/affiliates")
@guarded("write")
async def create_affiliate(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewAffiliate)
    async with edge.pg.acquire() as conn:
        return json(201, await manage.create_affiliate(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/links")
@guarded("write")
async def create_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewLink)
    async with edge.pg.acquire() as conn:
        return json(201, await manage.create_link(conn, edge.redis, edge.keys, p.workspace_id, **body.model_dump()))


@routes.post("/v1/keys")
@guarded("*")
async def create_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    # minting keys takes "*": a "write" key must not be able to make itself a "*" key
    body = await parse(request, NewKey)
    if body.affiliate_id is not None:
        manage.as_uuid(body.affiliate_id)
    async with edge.pg.acquire() as conn:
        created = await admin.create_key(
            conn, edge.redis, edge.keys, workspace_id=p.workspace_id, scopes=list(body.scopes),
            affiliate_id=body.affiliate_id, name=body.name,
        )  # fmt: skip
    return json(201, created)


@routes.delete("/v1/keys/{prefix}")
@guarded("*")
async def revoke_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with edge.pg.acquire() as conn:
        owned = await conn.fetchval(
            "SELECT 1 FROM api_keys WHERE prefix = $1 AND workspace_id = $2",
            segment(request, "prefix"),
            p.workspace_id,
        )
        if not owned:
            raise NotFound("key not found")
        return json(200, await admin.revoke_key(conn, edge.redis, edge.keys, request.match_info["prefix"]))


@routes.patch("/v1/workspace")
@guarded("write")
async def patch_workspace(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, WorkspacePatch)
    async with edge.pg.acquire() as conn:
        return json(
            200,
            await admin.update_workspace(
                conn,
                p.workspace_id,
                bot_policy=body.bot_policy,
                fraud_policy={str(k): str(v) for k, v in body.fraud_policy.items()} if body.fraud_policy else None,
            ),
        )


@routes.patch("/v1/links/{id}")
@guarded("write")
async def patch_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, LinkPatch)
    async with edge.pg.acquire() as conn:
        link = await manage.update_link(
            conn, edge.redis, edge.keys, p.workspace_id, request.match_info["id"], **body.model_dump()
        )
    return json(200, link)


@routes.get("/v1/links/{id}")
@guarded("read")
async def get_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with edge.pg.acquire() as conn:
        return json(200, await manage.get_link(conn, p.workspace_id, request.match_info["id"]))


@routes.get("/v1/events")
@guarded("read")
async def list_events(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    q = request.query
    type_ = q.get("type")
    if type_ is not None and type_ not in ("click", "lead", "conversion"):
        return error(400, "invalid_request", "type: one of click, lead, conversion")
    limit = limit_param(request)
    if isinstance(limit, web.Response):
        return limit
    async with edge.pg.acquire() as conn:
        events = await manage.list_events(conn, p.workspace_id, link_id=q.get("link_id"), type_=type_, limit=limit)
    return json(200, {"data": events})


@routes.get("/v1/customers/{external_id}")
@guarded("read")
async def get_customer(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with edge.pg.acquire() as conn:
        return json(200, await manage.get_customer(conn, p.workspace_id, segment(request, "external_id")))


@routes.get("/v1/affiliate/links")
@guarded("read", affiliate=True)
async def affiliate_links(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    async with edge.pg.acquire() as conn:
        return json(200, {"data": await manage.affiliate_links(conn, p.workspace_id, p.affiliate_id)})


@routes.get("/v1/affiliate/stats")
@guarded("read", affiliate=True)
async def affiliate_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with edge.pg.acquire() as conn:
        return json(200, await stats.affiliate_stats(conn, p.workspace_id, p.affiliate_id, start, to))
