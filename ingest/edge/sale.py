"""A sale, the same on every route that takes one: Refport's ``POST /api/track/sale``,
Affixo's ``POST /v1/track/conversion`` and the batch route's type ``sale``.

A sale names its customer by the external id its lead gave (Refport's
``customerExternalId``), an amount as an exact integer in the currency's minor unit (4900
is $49.00; never a float), an ISO 4217 currency (default ``usd``), and optionally an
invoice. The edge looks nothing up: the workers attribute the sale to the customer's lead
(``workers/consumer/sales.py``). Its partition follows its invoice, else its customer
(``Envelope.routing_key``): every copy of one invoice, and its key's record, meet in one
partition.

Counted once, at two levels:

- an invoice is the sale's idempotency key when the request carries no
  ``Idempotency-Key``: within the key window every copy through one route is answered as
  the first was (whatever else it asks), and Redis appends one;
- ``(workspace, invoice)`` is unique in Postgres, for ever: copies that reach the workers
  by any path (another route, another edge, a spool, weeks apart) count nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.contract.bounds import MAX_KEYS
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Envelope, EventType
from ingest.contract.fields import (
    AMOUNT,
    MAX_AMOUNT,
    Currency,
    ExternalId,
    Integer,
    Metadata,
    NoNul,
    OrderId,
    Processor,
)
from ingest.edge import accept, enqueue, keyed
from ingest.edge.bodies import customer_aliases, no_default
from ingest.edge.dub_shapes import sale_answer
from ingest.edge.enqueue import OUTCOME
from ingest.edge.idempotency import Claim, fingerprint
from ingest.edge.problem import Down, Problem
from ingest.edge.resolve import Unavailable, fallback, pool_of, resolve_click, seen_link
from ingest.edge.state import Edge

M = TypeVar("M", bound=BaseModel)


class RefportSale(BaseModel):
    """Refport's sale (and the batch route's ``sale`` item): Dub's ``/track/sale`` fields."""

    model_config = ConfigDict(extra="ignore")
    customerExternalId: ExternalId = Field(min_length=1, max_length=256)
    amount: Integer = Field(ge=0, le=MAX_AMOUNT, description=AMOUNT)
    currency: Currency = "usd"
    eventName: NoNul = Field("Purchase", min_length=1, max_length=256)
    paymentProcessor: Processor = "custom"
    invoiceId: OrderId = Field(None, min_length=1, max_length=256)
    leadEventName: NoNul | None = Field(None, min_length=1, max_length=256)
    metadata: Metadata | None = Field(None, max_length=MAX_KEYS)


class TrackSale(RefportSale):
    """A sale on Dub's ``POST /track/sale`` and on Refport's ``POST /api/track/sale`` (the
    same API, field for field): Refport's fields, and what Dub's SDKs also send. With a
    ``clickId``, the sale is tracked directly: its lead is made from the click
    (``leadEventName``, else ``DIRECT_LEAD``) where the customer has no lead of that name."""

    clickId: NoNul | None = Field(None, max_length=128, description="Direct sale tracking: the customer's click")
    customerName: NoNul | None = Field(None, max_length=256)
    customerEmail: str | None = Field(None, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+$")
    customerAvatar: NoNul | None = Field(None, max_length=2048)
    customerExternalId: ExternalId = Field(  # type: ignore[assignment]
        None,  # checked once its older names are read (_named)
        max_length=256,
        description="Required, here or by one of its older names (externalId, customerId)",
        json_schema_extra=no_default,
    )
    externalId: str | None = Field(None, deprecated=True, description="customerExternalId's older name")
    customerId: str | None = Field(None, deprecated=True, description="customerExternalId's older name")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return customer_aliases(data)

    @model_validator(mode="after")
    def _named(self) -> TrackSale:
        if not self.customerExternalId:
            raise ValueError("customerExternalId is required")
        return self


DIRECT_LEAD = "Direct sale tracking lead event"  # Dub's name for a direct sale's lead


class AffixoConversion(BaseModel):
    """Affixo's conversion: the same sale in Affixo's snake case."""

    model_config = ConfigDict(extra="ignore")
    customer_id: ExternalId = Field(min_length=1, max_length=256, description="Your id of the customer its lead named")
    amount: Integer = Field(ge=0, le=MAX_AMOUNT, description=AMOUNT)
    currency: Currency = "usd"
    event_name: NoNul = Field("Purchase", min_length=1, max_length=256)
    payment_processor: Processor = "custom"
    invoice_id: OrderId = Field(None, min_length=1, max_length=256)
    lead_event_name: NoNul | None = Field(None, min_length=1, max_length=256)
    metadata: Metadata | None = Field(None, max_length=MAX_KEYS)


def from_refport(body: RefportSale) -> dict[str, Any]:
    """The sale's payload (the stream entry's), from Refport's fields."""
    return _payload(
        body.customerExternalId,
        body.amount,
        body.currency,
        body.eventName,
        body.paymentProcessor,
        body.invoiceId,
        body.leadEventName,
        body.metadata,
    )


def answer(body: TrackSale, event: Envelope) -> bytes:
    """A sale's answer on Dub's API (Refport's too): the event name, the customer, and the
    sale as recorded (``ingest.edge.dub_shapes``)."""
    echo = {
        "amount": body.amount,
        "currency": body.currency,
        "paymentProcessor": body.paymentProcessor,
        "invoiceId": body.invoiceId,
        "metadata": body.metadata,
    }
    return sale_answer(
        body.eventName, body.customerExternalId, body.customerName, body.customerEmail, body.customerAvatar, echo
    )


def from_affixo(body: AffixoConversion) -> dict[str, Any]:
    return _payload(
        body.customer_id,
        body.amount,
        body.currency,
        body.event_name,
        body.payment_processor,
        body.invoice_id,
        body.lead_event_name,
        body.metadata,
    )


def _payload(
    customer: str,
    amount: int,
    currency: str,
    name: str,
    processor: str,
    invoice: str | None,
    lead_name: str | None,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "external_id": customer,
        "amount": amount,
        "currency": currency,
        "name": name,
        "processor": processor,
    }
    for key, value in (("invoice", invoice), ("lead_name", lead_name), ("metadata", metadata)):
        if value is not None:
            payload[key] = value
    return payload


def envelope(dialect: str, workspace_id: str, payload: dict[str, Any]) -> Envelope:
    """A sale is server to server: the caller's address and User-Agent are its server's,
    neither personal nor worth keeping."""
    return Envelope(type=EventType.SALE, dialect=dialect, workspace_id=workspace_id, payload=payload)


def claim(route: str, workspace_id: str, idem_key: str | None, payload: dict[str, Any]) -> Claim | None:
    """The request's ``Idempotency-Key`` (a repeat must ask the same), else its invoice:
    every copy of an invoice is answered as the first, whatever else it asks."""
    if idem_key is not None:
        return Claim.of(idem_key, route, workspace_id, fingerprint(payload))
    invoice = payload.get("invoice")
    if isinstance(invoice, str):
        return Claim.of(invoice, f"{route}-invoice", workspace_id, fingerprint(invoice))
    return None


# a step before the sale's own (``direct_lead``): (edge, dialect, workspace, body) -> whether
# it appended a lead first; raises the route's refusal or 503
LeadFirst = Callable[[Edge, "SaleDialect[Any]", str, Any], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class SaleDialect(Generic[M]):
    """A dialect's sale route, all it says of its own: the envelope's ``dialect``, its
    ``voice``, its body's ``model``, its keyed ``refusals`` (``accept.Refusals``), the
    sale's ``payload`` from its body, and its ``answer`` to the body and event; for Dub's
    API, whose sale may name its customer's click (``TrackSale.clickId``), the step that
    makes the lead first (``lead_first``: ``direct_lead``) and the refusal of a click it
    does not know (``unknown_click``)."""

    dialect: str
    voice: accept.Voice
    model: type[M]
    refusals: accept.Refusals
    payload: Callable[[M], dict[str, Any]]
    answer: Callable[[M, Envelope], bytes]
    lead_first: LeadFirst | None = None
    unknown_click: Callable[[], Problem] | None = None


async def track(request: web.Request, dialect: SaleDialect[M]) -> web.Response:
    """A dialect's sale route: the keyed start, the sale's event, and its append with its
    claim (the ``Idempotency-Key``, else the invoice); Redis down is the route's 503. What
    is raised below it is rendered in the dialect's voice."""
    try:
        return await _track(request, dialect)
    except (Problem, Down) as exc:
        return dialect.voice.render(exc)


async def _track(request: web.Request, dialect: SaleDialect[M]) -> web.Response:
    voice = dialect.voice
    started = await accept.caller(request, dialect.model, dialect.refusals)
    workspace, idem_key = started.admitted.principal.workspace_id, started.admitted.idem_key
    # the lead first, where the dialect's sale makes one: its event (and received time)
    # precedes its sale's, which it attributes
    led = dialect.lead_first is not None and await dialect.lead_first(started.edge, dialect, workspace, started.body)
    payload = dialect.payload(started.body)
    event = envelope(dialect.dialect, workspace, payload)
    route = event.routing_key()
    assert route is not None
    answer, headers = dialect.answer(started.body, event), started.found.verdict.headers
    claimed = claim(voice.route, workspace, idem_key, payload)
    try:
        if claimed is not None:
            return await keyed.put_once(
                started.edge, voice.refuse, claimed, event, route, answer, headers, link=None, spool=False
            )
        await enqueue.put(started.edge, event, route, link=None, spool=False)
        return accept.accepted(answer, headers)
    except Down as exc:
        if not led:
            raise
        refused = voice.render(exc)
        refused.headers[OUTCOME] = "unknown"  # the lead is in: the request is not refused as a whole
        return refused


# whether the customer has a row: a direct sale makes no lead for a customer who has one
_CUSTOMER_KNOWN = "SELECT EXISTS (SELECT 1 FROM customers WHERE workspace_id = $1 AND external_id = $2)"


async def direct_lead(edge: Edge, dialect: SaleDialect[Any], workspace: str, body: TrackSale) -> bool:
    """Direct sale tracking, Dub's (a ``SaleDialect.lead_first``): a sale that names its
    customer's click (``clickId``) makes the customer's lead from it (named
    ``leadEventName``, else ``DIRECT_LEAD``) where the customer has no row yet, appended
    before the sale. True once that lead is in Redis, False when none was needed; raises the
    route's refusal of a click it does not know (``Problem``), or its 503 (``Down``). The
    lead is idempotent on (customer, name) like any: a repeat counts it once."""
    click_id = body.clickId
    if not click_id:
        return False
    refuse = dialect.unknown_click or (lambda: Problem(400, "invalid_click_id", "Unknown clickId"))
    try:
        (cached,) = await edge.batcher.execute(("GET", edge.keys.click(click_id)))
        click = await resolve_click(edge, click_id, cached)
        if click is None or click.workspace_id != workspace:
            edge.drops.note(workspace, None, "unknown_code")
            raise refuse()
        known = await fallback(edge, lambda: _customer_known(edge, workspace, body.customerExternalId))
    except Unavailable as exc:
        raise Down() from exc
    except (NotSent, OutcomeUnknown) as exc:
        raise Down(exc) from exc
    if known:
        return False
    payload: dict[str, Any] = {
        "code": click.code,
        "click_id": click.click_id,
        "visitor_id": click.visitor_id,
        "name": body.leadEventName or DIRECT_LEAD,
        "external_id": body.customerExternalId,
    }
    for field, value in (
        ("email", body.customerEmail),
        ("customer_name", body.customerName),
        ("avatar", body.customerAvatar),
    ):
        if value is not None:
            payload[field] = value
    lead = Envelope(type=EventType.LEAD, dialect=dialect.dialect, workspace_id=workspace, payload=payload)
    await enqueue.put(edge, lead, click.code, link=seen_link(edge, click.code), spool=False)
    return True


async def _customer_known(edge: Edge, workspace: str, external_id: str) -> bool:
    async with (await pool_of(edge, workspace)).acquire() as conn:
        return bool(await conn.fetchval(_CUSTOMER_KNOWN, workspace, external_id))


# a sale's steps, in their order (a route's ``STEPS``: tests/test_route_steps.py); a dialect
# whose sale may name its customer's click takes ``direct_lead`` first (``lead_first``)
STEPS: tuple[Callable[..., Any], ...] = (accept.caller, keyed.put_once, enqueue.put, accept.accepted)
