"""Reads of what the workers stored, in the management API: ``GET /v1/events`` (recent
events with their enrichment), ``GET /v1/conversions`` (sales, newest first, by page),
``GET /v1/customers/{external_id}``, and an affiliate key's own links, ``GET
/v1/affiliate/links`` (by page). Every list is bounded: ``?limit=`` at most 500. Stats are ``routes.stats``'.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract.connections import acquired
from ingest.edge.auth import Principal
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import manage
from ingest.manage.routes._guard import CUSTOMER, LIMIT, MANAGE, error, guarded, id_forms, json, limit_param
from ingest.manage.routes.links import LinkList

routes = web.RouteTableDef()


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


@routes.get("/v1/events")
@documented(
    "Recent events with their enrichment",
    "Management",
    {200: EventList, **MANAGE},
    security="bearer",
    query={
        "link_id": {"type": "string"},
        "type": {"type": "string", "enum": ["click", "lead", "conversion"]},
        "limit": LIMIT,
    },
)
@guarded("read")
async def list_events(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    q = request.query
    type_ = q.get("type")
    if type_ is not None and type_ not in ("click", "lead", "conversion"):
        return error(400, "invalid_request", "type: one of click, lead, conversion")
    limit = limit_param(request)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        events = await manage.list_events(conn, p.workspace_id, link_id=q.get("link_id"), type_=type_, limit=limit)
    return json(200, {"data": events})


@routes.get("/v1/conversions")
@documented(
    "The workspace's sales, newest first: of a link, an affiliate or a customer "
    "(its external id); `before` is the `next` of the page before",
    "Management",
    {200: SaleList, **MANAGE},
    security="bearer",
    query={
        "link_id": {"type": "string"},
        "affiliate_id": {"type": "string"},
        "customer_id": CUSTOMER,
        "before": {"type": "string"},
        "limit": LIMIT,
    },
)
@guarded("read")
async def list_conversions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    q = request.query
    limit = limit_param(request)
    filters = {f: q[f] for f in manage.SALE_FILTERS if f in q}
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await manage.list_sales(conn, p.workspace_id, filters, q.get("before"), limit))


@routes.get("/v1/customers/{external_id}")
@documented("A customer by your external id", "Management", {200: Customer, **MANAGE}, security="bearer")
@guarded("read")
async def get_customer(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await manage.get_customer(conn, p.workspace_id, id_forms(request, "external_id")))


@routes.get("/v1/affiliate/links")
@documented(
    "The calling affiliate's links (affiliate key), newest first, by page",
    "Affiliate",
    {200: LinkList, **MANAGE},
    security="bearer",
    query={"before": {"type": "string", "format": "uuid"}, "limit": LIMIT},
)
@guarded("read", affiliate=True)
async def affiliate_links(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    """The calling affiliate's links by page, newest first (``?limit=``, ``?before=``)."""
    assert p.affiliate_id is not None
    limit = limit_param(request)
    before = request.query.get("before")
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await manage.affiliate_links(conn, p.workspace_id, p.affiliate_id, before, limit))
