"""The management API, ``/v1``: JSON, ``Authorization: Bearer`` workspace key, scope
``write`` for changes and ``read`` for reads, everything scoped to the key's workspace.
Affiliate keys (read-only) reach ``/v1/affiliate/*`` and see only their own links and stats.
Errors: ``{"error": code, "detail": text}``, as the Affixo API (seed 003) answers.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ids, links
from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, CommitUnknown, acquired
from ingest.contract.errors import NotFound
from ingest.contract.fields import ExternalId, Ident, Integer, Text, Url
from ingest.contract.fraud import FraudPolicy, FraudRule
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.state import Edge
from ingest.manage import admin, manage, stats, suppressions
from ingest.manage.routes._guard import error, guarded, id_forms, json, limit_param, segment
from ingest.privacy import erasure, erasure_affiliate, erasure_copy, external_ids

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
    external_id: ExternalId = Field(min_length=1, max_length=256)
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
    fraud_policy: dict[FraudRule, FraudPolicy] | None = Field(
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


class Sale(BaseModel):
    model_config = ConfigDict(extra="allow")
    event_id: str
    invoice_id: str | None
    customer_external_id: str
    amount: int = Field(description="In the currency's minor unit")
    currency: str
    link_id: str | None = Field(description="The link it is attributed to; null: unattributed")
    affiliate_id: str | None
    unattributed: str | None = Field(description="Why it is credited to no affiliate: no_lead")
    received_at: str
    refunds: int = Field(description="How many refunds it has had")
    refunded: int = Field(description="Their total, in the currency's minor unit: never more than amount")


class SaleList(BaseModel):
    data: list[Sale]
    next: str | None = Field(description="The next page's `before`; null on the last page")


class Customer(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    external_id: str | None
    visitor_id: str
    status: Literal["click", "lead", "converted"]


class NewSuppression(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["visitor", "customer", "ip"] = Field(
        description="A visitor id, a customer's external id, or a client address"
    )
    value: Text = Field(min_length=1, max_length=256)


class Suppression(BaseModel):
    id: str = Field(description="The entry's digest: the list never holds the value")
    kind: Literal["visitor", "customer", "ip"]
    created_at: str
    created_by: str | None = None


class SuppressionList(BaseModel):
    data: list[Suppression]


class Erasure(BaseModel):
    model_config = ConfigDict(extra="allow")
    erasure_id: str
    workspace_id: str
    status: Literal["pending", "done"]
    pending: list[Literal["postgres", "redis", "archive"]] = Field(
        description="Places still holding the person: Redis and the archive are finished by the workers' sweep"
    )
    requested_at: str
    requested_by: str = Field(description="The prefix of the key that asked, or cli")
    archive_due: str = Field(description="The archive's segments are rewritten by then (REFSTREAM_ERASE_ARCHIVE_DAYS)")
    overdue: bool
    done: dict[str, Any] = Field(description="What each place's pass changed: counts of rows, entries, segments")


class AffiliateErasures(BaseModel):
    erasures: list[Erasure] = Field(description="One per affiliate erased (a participant: one per campaign)")


class DailyStats(BaseModel):
    day: str = Field(description="A UTC day (YYYY-MM-DD); in totals, absent")
    clicks: int
    unique_clicks: int
    bot_clicks: int
    leads: int
    conversions: int
    sales: dict[str, int] = Field(description="Sales attributed to the link(s), per currency (ISO 4217, lower case)")
    revenue: dict[str, int] = Field(description="Their amounts per currency, in its minor unit (never converted)")
    refunds: dict[str, int] = Field(description="Refunds of the day's sales, per currency")
    refunded: dict[str, int] = Field(description="Their amounts per currency, in its minor unit")
    commission: dict[str, int] = Field(
        description="Commissions earned per currency, reversals and refunds' clawbacks subtracted"
    )
    dropped: dict[str, int] = Field(
        description="Events not counted, by reason: bot, unknown_code, inactive_link, rate_limited, out_of_window,"
        " test_mode, duplicate, invalid, fraud (excluded by the fraud policy), no_lead (a sale credited to no"
        " affiliate)"
    )
    dropped_detail: dict[str, dict[str, int]] = Field(description="By reason, by detail: a bot's sub-reason, a rule")
    flagged: dict[str, int] = Field(description="Fraud flags by rule, whether the event was counted or excluded")


class StatsTotals(BaseModel):
    clicks: int
    unique_clicks: int
    bot_clicks: int
    leads: int
    conversions: int
    sales: dict[str, int]
    revenue: dict[str, int]
    refunds: dict[str, int]
    refunded: dict[str, int]
    commission: dict[str, int]
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


class WorkspaceStats(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    workspace_id: str
    from_: str = Field(alias="from")
    to: str
    totals: StatsTotals
    daily: list[DailyStats]


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


@routes.post("/v1/programs")
@guarded("write")
async def create_program(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewProgram)
    async with acquired(edge.pg) as conn:
        return json(201, await manage.create_program(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/affiliates")
@guarded("write")
async def create_affiliate(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewAffiliate)
    async with acquired(edge.pg) as conn:
        return json(201, await manage.create_affiliate(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/links")
@guarded("write")
async def create_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewLink)
    async with acquired(edge.pg) as conn:
        return json(201, await manage.create_link(conn, edge.redis, edge.keys, p.workspace_id, **body.model_dump()))


@routes.post("/v1/keys")
@guarded("*")
async def create_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    # minting keys takes "*": a "write" key must not be able to make itself a "*" key
    body = await parse(request, NewKey)
    if body.affiliate_id is not None:
        manage.as_uuid(body.affiliate_id)
    async with acquired(edge.pg) as conn:
        created = await admin.create_key(
            conn,
            edge.redis,
            edge.keys,
            workspace_id=p.workspace_id,
            scopes=list(body.scopes),
            affiliate_id=body.affiliate_id,
            name=body.name,
        )
    return json(201, created)


@routes.delete("/v1/keys/{prefix}")
@guarded("*")
async def revoke_key(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
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
    async with acquired(edge.pg) as conn:
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
    async with acquired(edge.pg) as conn:
        link = await manage.update_link(
            conn, edge.redis, edge.keys, p.workspace_id, request.match_info["id"], **body.model_dump()
        )
    return json(200, link)


@routes.get("/v1/links/{id}")
@guarded("read")
async def get_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
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
    async with acquired(edge.pg) as conn:
        events = await manage.list_events(conn, p.workspace_id, link_id=q.get("link_id"), type_=type_, limit=limit)
    return json(200, {"data": events})


@routes.get("/v1/conversions")
@guarded("read")
async def list_conversions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    q = request.query
    limit = limit_param(request)
    if isinstance(limit, web.Response):
        return limit
    filters = {f: q[f] for f in manage.SALE_FILTERS if f in q}
    async with acquired(edge.pg) as conn:
        return json(200, await manage.list_sales(conn, p.workspace_id, filters, q.get("before"), limit))


@routes.get("/v1/customers/{external_id}")
@guarded("read")
async def get_customer(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
        return json(200, await manage.get_customer(conn, p.workspace_id, id_forms(request, "external_id")))


@routes.delete("/v1/customers/{external_id}")
@guarded("erase")
async def erase_customer(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Forget a customer everywhere (docs/privacy.md): Postgres now, Redis and the archive
    by the workers; 202 with what is pending, and GET /v1/erasures/{id} follows it."""
    id_forms(request, "external_id")  # 400 for one that can name nobody
    async with acquired(edge.pg) as conn:  # the normalized id, as given, and as stored before the rule
        forms = await external_ids.subjects(conn, p.workspace_id, request.match_info["external_id"])
    days = edge.settings.erase_archive_days
    try:  # from here on, a failure may leave it begun: 503 "outcome unknown", and a retry finishes it
        erased = [await erasure.erase(edge.pg, p.workspace_id, form, by=p.prefix, archive_days=days) for form in forms]
        async with acquired(edge.pg) as conn:
            shown = await erasure.show(conn, p.workspace_id, str(erased[0].id))
            copy = await erasure_copy.commands(conn, edge.keys, [done.id for done in erased])
    except (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # a read-only one too
        raise CommitUnknown("the erasure") from exc
    # the ledger's copy outside Postgres (a restore that loses the erasure gets it back); the
    # sweep writes it too, and marks Redis done only once it is there
    if deletes := [*copy, *(d for done in erased for d in erasure.redis_deletes(edge.keys, done))]:
        try:
            await edge.batcher.execute(*deletes)
        except REDIS_ERRORS:
            pass  # the click cache's entries and rate-limit windows expire by themselves; the sweep copies
    return json(202, shown)


@routes.delete("/v1/affiliates/{id}")
@guarded("erase")
async def erase_affiliate(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Forget an affiliate (a partner, a person): their name, email, external id and
    addresses, wherever they are held; their links, commissions and payouts stay
    (docs/privacy.md). 202 with the erasure, as a customer's."""
    return await _erase_affiliates(edge, p, affiliate_id=segment(request, "id"))


@routes.delete("/v1/participants/{participant_id}")
@guarded("erase")
async def erase_participant(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """A Bricqs participant (an affiliate by external id, in every campaign): as above;
    202 with one erasure per campaign they were in."""
    return await _erase_affiliates(edge, p, participant_id=segment(request, "participant_id"))


async def _erase_affiliates(edge: Edge, p: Principal, **which: str) -> web.Response:
    try:  # as a customer's: a failure may leave it begun, and a retry finishes it
        done = await erasure_affiliate.erase(
            edge.pg, p.workspace_id, by=p.prefix, archive_days=edge.settings.erase_archive_days, **which
        )
        async with acquired(edge.pg) as conn:
            copy = await erasure_copy.commands(conn, edge.keys, [uuid.UUID(e["erasure_id"]) for e in done.erasures])
    except (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CommitUnknown("the erasure") from exc
    try:
        await links.put_committed(edge.redis, edge.keys, *done.cache)  # their external id, as a pseudonym
        await edge.batcher.execute(*copy, *erasure_affiliate.redis_commands(edge.keys, done))
    except REDIS_ERRORS:
        pass  # the sweep copies the ledger; the link cache is put again by the workers' refresh; windows expire
    return json(202, done.to_dict())


@routes.post("/v1/suppressions")
@guarded("write")
async def add_suppression(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """Do not track a visitor, customer or address: the edges answer their events as usual
    and store nothing, within REFSTREAM_SUPPRESSION_REFRESH_S."""
    body = await parse(request, NewSuppression)
    value = body.value
    if body.kind == "customer":  # as the lead routes store it (ingest.contract.ids)
        try:
            value = ids.normalize(value)
        except ids.InvalidId as exc:
            return error(400, "invalid_request", f"value: {exc}")
    async with acquired(edge.pg) as conn:
        return json(201, await suppressions.add(conn, p.workspace_id, body.kind, value, by=p.prefix))


@routes.get("/v1/suppressions")
@guarded("read")
async def list_suppressions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
        return json(200, await suppressions.listing(conn, p.workspace_id))


@routes.delete("/v1/suppressions/{id}")
@guarded("write")
async def remove_suppression(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
        await suppressions.remove(conn, p.workspace_id, segment(request, "id"))
    return web.Response(status=204)


@routes.get("/v1/erasures/{id}")
@guarded("erase")
async def get_erasure(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(edge.pg) as conn:
        return json(200, await erasure.show(conn, p.workspace_id, segment(request, "id")))


@routes.get("/v1/affiliate/links")
@guarded("read", affiliate=True)
async def affiliate_links(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    async with acquired(edge.pg) as conn:
        return json(200, {"data": await manage.affiliate_links(conn, p.workspace_id, p.affiliate_id)})


@routes.get("/v1/affiliate/stats")
@guarded("read", affiliate=True)
async def affiliate_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(edge.pg) as conn:
        return json(200, await stats.affiliate_stats(conn, p.workspace_id, p.affiliate_id, start, to))
