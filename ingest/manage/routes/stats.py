"""Stats and fraud settings of the management API: ``GET /v1/links/{id}/stats`` (counted
and dropped events by reason, flagged ones by rule, sales and revenue, per day), ``GET
/v1/stats`` (the same over the workspace, with what no link resolved for), ``GET
/v1/affiliate/stats`` (the same over an affiliate key's own links), and ``PATCH
/v1/programs/{id}/fraud`` (a program's fraud thresholds).
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ingest.contract.connections import acquired
from ingest.contract.errors import NotFound
from ingest.contract.fields import json_integer
from ingest.contract.fraud import FRAUD_THRESHOLDS
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import stats
from ingest.manage.routes._guard import DAY, MANAGE, MANAGE_BODY, error, guarded, json

routes = web.RouteTableDef()
# JSON integers (ingest.contract.fields.json_integer) within bounds; the bounds on the integer
# itself, before the validator, so that the document's schema says them (minimum, maximum)
Clicks = Annotated[int, Field(ge=1, le=100_000), BeforeValidator(json_integer)]
Seconds = Annotated[int, Field(ge=1, le=86_400), BeforeValidator(json_integer)]


class FraudThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    burst_clicks: Clicks | None = Field(None, description="click_burst: more clicks than this ...")
    burst_seconds: Seconds | None = Field(None, description="... from one IP on one link within this")
    fast_conversion_seconds: Seconds | None = Field(
        None, description="fast_conversion: a conversion sooner than this after its click"
    )


class ProgramFraud(BaseModel):
    program_id: str
    fraud_thresholds: dict[str, int]


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


def _uuid(raw: str, what: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise NotFound(f"{what} not found") from None


@routes.get("/v1/links/{id}/stats")
@documented(
    "A link's counted events, sales and revenue per currency, dropped events by "
    "reason and fraud flags by rule, "
    "per UTC day (from, to: YYYY-MM-DD, at most 366 days; default the last 30)",
    "Management",
    {200: LinkStats, **MANAGE},
    security="bearer",
    query={"from": DAY, "to": DAY},
)
@guarded("read")
async def link_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        found = await stats.link_stats(conn, p.workspace_id, _uuid(request.match_info["id"], "link"), start, to)
    if found is None:
        raise NotFound("link not found")
    return json(200, found)


@routes.get("/v1/stats")
@documented(
    "The workspace's counted events, sales and revenue per currency, dropped events by "
    "reason (with those no link resolved for: unknown codes, sales credited to no affiliate) and fraud flags by "
    "rule, per UTC day (from, to as a link's)",
    "Management",
    {200: WorkspaceStats, **MANAGE},
    security="bearer",
    query={"from": DAY, "to": DAY},
)
@guarded("read")
async def workspace_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await stats.workspace_stats(conn, p.workspace_id, start, to))


@routes.get("/v1/affiliate/stats")
@documented(
    "The calling affiliate's stats, its own links only: counted, dropped by "
    "reason, flagged by rule, sales, revenue, refunds and commission per currency, per UTC day (affiliate key;"
    " from, to as a link's stats)",
    "Affiliate",
    {200: AffiliateStats, **MANAGE},
    security="bearer",
    query={"from": DAY, "to": DAY},
)
@guarded("read", affiliate=True)
async def affiliate_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await stats.affiliate_stats(conn, p.workspace_id, p.affiliate_id, start, to))


@routes.patch("/v1/programs/{id}/fraud")
@documented(
    "Change a program's fraud thresholds (burst_clicks, burst_seconds, fast_conversion_seconds)",
    "Management",
    {200: ProgramFraud, **MANAGE_BODY},
    FraudThresholds,
    "bearer",
)
@guarded("write")
async def patch_fraud_thresholds(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, FraudThresholds)
    given = body.model_dump(exclude_none=True)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        row = await conn.fetchrow(
            "UPDATE programs SET fraud_thresholds = fraud_thresholds || $3::jsonb WHERE id = $1 AND workspace_id = $2"
            " RETURNING id, fraud_thresholds",
            _uuid(request.match_info["id"], "program"),
            UUID(p.workspace_id),
            given,
        )
    if row is None:
        raise NotFound("program not found")
    thresholds = {**FRAUD_THRESHOLDS, **row["fraud_thresholds"]}
    return json(200, {"program_id": str(row["id"]), "fraud_thresholds": thresholds})
