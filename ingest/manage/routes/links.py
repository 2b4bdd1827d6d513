"""Programs, affiliates and links in the management API, and the workspace's settings:
``POST /v1/programs``, ``POST /v1/affiliates``, ``POST /v1/links``, ``PATCH`` and ``GET
/v1/links/{id}``, ``PATCH /v1/workspace``. A link's writes go through ``ingest.manage.manage``,
which refreshes the Redis link cache after the commit.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract.connections import acquired
from ingest.contract.fields import ExternalId, Ident, Integer, Text, Url
from ingest.contract.fraud import FraudPolicy, FraudRule
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import admin, manage
from ingest.manage.routes._guard import MANAGE, MANAGE_BODY, ManageError, guarded, json

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
    data: list[Link] = Field(description="Newest first")
    next: str | None = Field(description="The next page's `before`; null on the last page")


@routes.post("/v1/programs")
@documented("Create a program", "Management", {201: Program, **MANAGE_BODY}, NewProgram, "bearer")
@guarded("write")
async def create_program(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewProgram)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(201, await manage.create_program(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/affiliates")
@documented(
    "Create an affiliate", "Management", {201: Affiliate, 409: ManageError, **MANAGE_BODY}, NewAffiliate, "bearer"
)
@guarded("write")
async def create_affiliate(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewAffiliate)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(201, await manage.create_affiliate(conn, p.workspace_id, **body.model_dump()))


@routes.post("/v1/links")
@documented("Create a link", "Management", {201: Link, 409: ManageError, **MANAGE_BODY}, NewLink, "bearer")
@guarded("write")
async def create_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewLink)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(
            201,
            await manage.create_link(
                conn, edge.redis, edge.keys, p.workspace_id, edge.shards.claim_code, **body.model_dump()
            ),
        )


@routes.patch("/v1/workspace")
@documented(
    "Change the calling key's workspace: bot_policy (exclude | count), fraud_policy (per rule: flag | exclude)",
    "Management",
    {200: Workspace, **MANAGE_BODY},
    WorkspacePatch,
    "bearer",
)
@guarded("write")
async def patch_workspace(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, WorkspacePatch)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
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
@documented("Change a link's status or URL", "Management", {200: Link, **MANAGE_BODY}, LinkPatch, "bearer")
@guarded("write")
async def patch_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, LinkPatch)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        link = await manage.update_link(
            conn, edge.redis, edge.keys, p.workspace_id, request.match_info["id"], **body.model_dump()
        )
    return json(200, link)


@routes.get("/v1/links/{id}")
@documented("A link with its counters", "Management", {200: Link, **MANAGE}, security="bearer")
@guarded("read")
async def get_link(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await manage.get_link(conn, p.workspace_id, request.match_info["id"]))
