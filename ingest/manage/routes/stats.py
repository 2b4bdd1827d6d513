"""Stats and fraud settings of the management API: ``GET /v1/links/{id}/stats`` (counted
and dropped events by reason, flagged ones by rule, sales and revenue, per day), ``GET
/v1/stats`` (the same over the workspace, with what no link resolved for), and ``PATCH
/v1/programs/{id}/fraud`` (a program's fraud thresholds). The affiliate's own view is
``GET /v1/affiliate/stats`` (in ``manage``, beside the other affiliate routes).
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ingest.contract.connections import acquired
from ingest.contract.errors import NotFound
from ingest.contract.fraud import FRAUD_THRESHOLDS
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.fields import json_integer
from ingest.edge.state import Edge
from ingest.manage import stats
from ingest.manage.routes._guard import error, guarded, json

routes = web.RouteTableDef()
# JSON integers (ingest.edge.fields.json_integer) within bounds; the bounds on the integer
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


def _uuid(raw: str, what: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise NotFound(f"{what} not found") from None


@routes.get("/v1/links/{id}/stats")
@guarded("read")
async def link_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(edge.pg) as conn:
        found = await stats.link_stats(conn, p.workspace_id, _uuid(request.match_info["id"], "link"), start, to)
    if found is None:
        raise NotFound("link not found")
    return json(200, found)


@routes.get("/v1/stats")
@guarded("read")
async def workspace_stats(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    try:
        start, to = stats.day_range(request.query.get("from"), request.query.get("to"))
    except stats.BadRange as exc:
        return error(400, "invalid_request", str(exc))
    async with acquired(edge.pg) as conn:
        return json(200, await stats.workspace_stats(conn, p.workspace_id, start, to))


@routes.patch("/v1/programs/{id}/fraud")
@guarded("write")
async def patch_fraud_thresholds(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, FraudThresholds)
    given = body.model_dump(exclude_none=True)
    async with acquired(edge.pg) as conn:
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
