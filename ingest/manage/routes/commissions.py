"""Commissions in the management API: a program's rules (``PATCH
/v1/programs/{id}/commission``), the workspace's ledger (``GET /v1/commissions``) and an
affiliate's own (``GET /v1/affiliate/commissions``, an affiliate key: never another's);
payouts, made (``POST /v1/payouts``), marked paid (``POST /v1/payouts/{id}/paid``) and read
(``GET /v1/payouts``, ``GET /v1/affiliate/payouts``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ingest.contract import currency
from ingest.contract.connections import acquired
from ingest.contract.fields import MAX_AMOUNT, json_integer
from ingest.edge.auth import Principal
from ingest.edge.body import parse
from ingest.edge.documented import documented
from ingest.edge.state import Edge
from ingest.manage import ledger
from ingest.manage.routes._guard import (
    CURRENCY,
    LIMIT,
    MANAGE,
    MANAGE_BODY,
    SEQ,
    ManageError,
    error,
    guarded,
    json,
    limit_param,
)

routes = web.RouteTableDef()

Bps = Annotated[int, Field(ge=0, le=10_000), BeforeValidator(json_integer)]
Minor = Annotated[int, Field(ge=0, le=MAX_AMOUNT), BeforeValidator(json_integer)]
Months = Annotated[int, Field(ge=1, le=120), BeforeValidator(json_integer)]
Days = Annotated[int, Field(ge=0, le=3650), BeforeValidator(json_integer)]
MAX_FLATS = 64  # currencies in one sale_flat


def flat_amounts(value: Any) -> Any:
    """``sale_flat``: a mapping of ISO 4217 code (lower case) to an amount of that currency,
    in minor units (a JSON integer: ``{"usd": 500}`` is $5.00) or in major units (a decimal
    text: ``{"usd": "5.00", "jpy": "500", "kwd": "0.500"}``), turned into minor units by the
    currency's ISO 4217 exponent. One number (the rules' older form): in the program's
    currency (``lead_currency``), as the ledger reads it."""
    if not isinstance(value, dict):
        return json_integer(value)
    if len(value) > MAX_FLATS:
        raise ValueError(f"at most {MAX_FLATS} currencies")
    out: dict[str, int] = {}
    for code, amount in value.items():
        if not currency.valid_code(code):
            raise ValueError(f"{code[:8]!r}: a currency is ISO 4217, lower case (usd)")
        minor = currency.to_minor(amount, code) if isinstance(amount, str) else json_integer(amount)
        if not 0 <= minor <= MAX_AMOUNT:
            raise ValueError(f"{code}: from 0 to {MAX_AMOUNT} minor units")
        out[code] = minor
    return out


# what flat_amounts returns, as the document states it: a currency code for each key, at most
# MAX_FLATS of them, each amount in bounds (a decimal text is turned into minor units first)
Code = Annotated[str, Field(pattern=r"^[a-z]{3}$")]
Flat = Annotated[
    Minor
    | Annotated[dict[Code, Minor], Field(max_length=MAX_FLATS, json_schema_extra={"additionalProperties": False})],
    BeforeValidator(flat_amounts),
]
EventName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]


class CommissionRules(BaseModel):
    """The rules to change; the others are kept (all default to earning nothing)."""

    model_config = ConfigDict(extra="forbid")
    sale_bps: Bps | None = Field(None, description="A share of each sale, in basis points: 2000 is 20%")
    sale_flat: Flat | None = Field(
        None,
        description="A flat amount per sale, per currency: {currency: minor units (500) or major units as a decimal"
        ' text ("5.00")}; a sale in a currency not listed earns no flat amount. Replaces the whole mapping.',
    )
    lead_flat: Minor | None = Field(None, description="A customer's lead's flat amount, in lead_currency's minor unit")
    lead_currency: str | None = Field(None, pattern=r"^[a-z]{3}$", description="ISO 4217, lower case")
    lead_events: list[EventName] | None = Field(
        None,
        max_length=32,
        description="Lead event names that each earn lead_flat once per customer; empty (the default): the"
        " customer's first lead earns it, once per program",
    )
    duration: Literal["lifetime", "months", "first_sale"] | None = Field(
        None,
        description="Which sales of a customer earn: all, for ever; those within duration_months of the customer's"
        " first lead; the first",
    )
    duration_months: Months | None = None
    hold_days: Days | None = Field(None, description="Pending this long after the sale or lead, then approved")


class ProgramCommission(BaseModel):
    program_id: str
    commission: dict[str, object]


class Commission(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: Literal["sale", "lead", "reversal", "clawback"]
    source_id: str = Field(
        description="The sale's or lead's event id (a reversal: the sale or lead it takes back; a clawback: its"
        " refund's id)"
    )
    affiliate_id: str
    amount: int = Field(
        description="Minor units; negative for a reversal or a clawback, in the currency of the row it takes back"
    )
    currency: str
    status: Literal["pending", "approved", "paid"]


class CommissionList(BaseModel):
    data: list[Commission]
    next: str | None = Field(description="The next page's `before`; null on the last page")


@routes.patch("/v1/programs/{id}/commission")
@documented(
    "Change a program's commission rules (the others kept): sale_bps, "
    "sale_flat (per currency), lead_flat, lead_currency, lead_events, duration (lifetime, months, first_sale), "
    "duration_months, hold_days",
    "Management",
    {200: ProgramCommission, **MANAGE_BODY},
    CommissionRules,
    "bearer",
)
@guarded("write")
async def set_rules(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, CommissionRules)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        out = await ledger.set_rules(conn, p.workspace_id, request.match_info["id"], body.model_dump(exclude_none=True))
    return json(200, out)


STATUSES = {"commissions": ("pending", "approved", "paid"), "payouts": ("pending", "paid")}


async def _page(request: web.Request, edge: Edge, p: Principal, table: str, affiliate_id: str | None) -> web.Response:
    limit = limit_param(request)
    q = request.query
    status = q.get("status")
    if status is not None and status not in STATUSES[table]:
        return error(400, "invalid_request", f"status: one of {', '.join(STATUSES[table])}")
    filters = {f: q[f] for f in ledger.FILTERS if f in q and (table == "commissions" or f != "program_id")}
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(
            200,
            await ledger.page(conn, table, p.workspace_id, filters, q.get("before"), limit, affiliate_id=affiliate_id),
        )


@routes.get("/v1/commissions")
@documented(
    "The commission ledger, newest first: by affiliate, program, status or currency; "
    "`before` is the `next` of the page before",
    "Management",
    {200: CommissionList, **MANAGE},
    security="bearer",
    query={
        "affiliate_id": {"type": "string"},
        "program_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
        "currency": CURRENCY,
        "before": SEQ,
        "limit": LIMIT,
    },
)
@guarded("read")
async def list_commissions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    return await _page(request, edge, p, "commissions", None)


@routes.get("/v1/affiliate/commissions")
@documented(
    "The calling affiliate's own commissions (an affiliate key)",
    "Affiliate",
    {200: CommissionList, **MANAGE},
    security="bearer",
    query={
        "program_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "approved", "paid"]},
        "currency": CURRENCY,
        "before": SEQ,
        "limit": LIMIT,
    },
)
@guarded("read", affiliate=True)
async def affiliate_commissions(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    return await _page(request, edge, p, "commissions", p.affiliate_id)


class NewPayout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    affiliate_id: str = Field(min_length=1, max_length=64)
    currency: str = Field(pattern=r"^[a-z]{3}$", description="ISO 4217, lower case: one payout per currency")


class Payout(BaseModel):
    id: str
    affiliate_id: str
    currency: str
    amount: int = Field(description="The sum of its commissions (reversals included), minor units, above 0")
    commissions: int
    status: Literal["pending", "paid"]
    created_at: str
    paid_at: str | None


class PayoutList(BaseModel):
    data: list[Payout]
    next: str | None


@routes.post("/v1/payouts")
@documented(
    "A payout of an affiliate's approved, unpaid commissions in one currency (reversals "
    "included); 409 when they sum to nothing",
    "Management",
    {201: Payout, 409: ManageError, **MANAGE_BODY},
    NewPayout,
    "bearer",
)
@guarded("write")
async def create_payout(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    body = await parse(request, NewPayout)
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(201, await ledger.create_payout(conn, p.workspace_id, body.affiliate_id, body.currency))


@routes.post("/v1/payouts/{id}/paid")
@documented("Mark a payout, and its commissions, paid", "Management", {200: Payout, **MANAGE}, security="bearer")
@guarded("write")
async def mark_paid(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    async with acquired(await edge.pool(p.workspace_id)) as conn:
        return json(200, await ledger.mark_paid(conn, p.workspace_id, request.match_info["id"]))


@routes.get("/v1/payouts")
@documented(
    "Payouts, newest first: by affiliate, status or currency",
    "Management",
    {200: PayoutList, **MANAGE},
    security="bearer",
    query={
        "affiliate_id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "paid"]},
        "currency": CURRENCY,
        "before": SEQ,
        "limit": LIMIT,
    },
)
@guarded("read")
async def list_payouts(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    return await _page(request, edge, p, "payouts", None)


@routes.get("/v1/affiliate/payouts")
@documented(
    "The calling affiliate's own payouts (an affiliate key)",
    "Affiliate",
    {200: PayoutList, **MANAGE},
    security="bearer",
    query={
        "status": {"type": "string", "enum": ["pending", "paid"]},
        "currency": CURRENCY,
        "before": SEQ,
        "limit": LIMIT,
    },
)
@guarded("read", affiliate=True)
async def affiliate_payouts(request: web.Request, edge: Edge, p: Principal) -> web.Response:
    assert p.affiliate_id is not None
    return await _page(request, edge, p, "payouts", p.affiliate_id)
