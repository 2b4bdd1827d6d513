"""The batch's items (``ingest.edge.routes.batch``): their models (each ``type`` validated
by the same model as its single-event route), the body parsed into items, each item
validated and its idempotency key found (``item_claim``), its envelope made from what the
batch's lookup found (``item_envelope``), and its result (``ItemResult``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, Field, RootModel, ValidationError

from ingest.contract import clicks, ids, links
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.fields import NoNul
from ingest.edge import sale
from ingest.edge.bodies import FINGERPRINT_CONFIDENCE, AffixoClick, BricqsConvert, RefportLead, new_visitor_id
from ingest.edge.body import BodyError, bounded, describe
from ingest.edge.idempotency import REUSED, Answer, Claim, InvalidKey, fingerprint, valid_key
from ingest.edge.refund import RefportRefund
from ingest.edge.sale import RefportSale

MAX_EVENTS = 500


class BatchClick(AffixoClick):
    ip: NoNul | None = Field(None, max_length=64, description="The visitor's address, as your server saw it")
    user_agent: NoNul | None = Field(None, max_length=2048, description="The visitor's User-Agent")


MODELS: dict[str, type[BaseModel]] = {
    "click": BatchClick,
    "lead": RefportLead,
    "conversion": BricqsConvert,
    "sale": RefportSale,
    "refund": RefportRefund,
}


class BatchClickItem(BatchClick):
    type: Literal["click"]


class BatchLeadItem(RefportLead):
    type: Literal["lead"]


class BatchConversionItem(BricqsConvert):
    type: Literal["conversion"]


class BatchSaleItem(RefportSale):
    type: Literal["sale"]


class BatchRefundItem(RefportRefund):
    """Recorded in Postgres at once, in its turn (``ingest.edge.refund``); ``event_id`` is the
    refund's id. Its key: its ``refundId``, else its ``idempotency_key``, else the request's
    ``Idempotency-Key`` and its place."""

    type: Literal["refund"]


BatchItem = Annotated[
    BatchClickItem | BatchLeadItem | BatchConversionItem | BatchSaleItem | BatchRefundItem, Field(discriminator="type")
]


class BatchBody(RootModel[Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_EVENTS)]]):
    """For the documentation: each item names its ``type`` and has the fields of that type."""


class ItemResult(BaseModel):
    index: int
    ok: bool
    event_id: str | None = None
    visitor_id: str | None = None
    match_method: str | None = None
    match_confidence: float | None = None
    error: str | None = None
    detail: str | None = None


class BatchResult(BaseModel):
    accepted: int
    rejected: int
    results: list[ItemResult]


def parse_items(raw: bytes, ndjson: bool) -> list[Any]:
    try:
        items = [orjson.loads(line) for line in raw.splitlines() if line.strip()] if ndjson else orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError(400, "invalid_json", "not a JSON array, nor NDJSON") from None
    if not isinstance(items, list):
        raise BodyError(400, "invalid_json", "a JSON array of events (or NDJSON)")
    # each item is a document like a single event's body: the same bounds, and one past
    # them refuses the request whole, as a body past the byte cap or not JSON does
    for i, item in enumerate(items[: MAX_EVENTS + 1]):
        bounded(item, f"events[{i}]")
    return items


def validated(index: int, item: Any) -> BaseModel | ItemResult:
    kind = item.get("type") if isinstance(item, dict) else None
    model = MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return ItemResult(
            index=index, ok=False, error="invalid", detail="type: one of click, lead, conversion, sale, refund"
        )
    if isinstance(item, dict) and b"\\u0000" in orjson.dumps(item):
        return ItemResult(index=index, ok=False, error="invalid", detail="NUL characters are not allowed")
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        return ItemResult(index=index, ok=False, error="invalid", detail=describe(exc))


def item_claim(index: int, item: Any, workspace: str, idem_key: str | None) -> Claim | ItemResult | None:
    """An item's own ``idempotency_key``, else one derived from the request's header and
    the item's place (a retried batch is the same list), else a sale's invoice; None
    without any."""
    own = item.get("idempotency_key") if isinstance(item, dict) else None
    if isinstance(own, str) and ids.placeholder(own):  # no one's key: as if none were sent
        own = None
    if own is None and idem_key is None:
        invoice = item.get("invoiceId") if isinstance(item, dict) and item.get("type") == "sale" else None
        if not isinstance(invoice, str) or ids.placeholder(invoice):  # a placeholder is no one's invoice
            return None
        return sale.claim("batch-sale", workspace, None, {"invoice": invoice})
    asked = fingerprint({k: v for k, v in item.items() if k != "idempotency_key"} if isinstance(item, dict) else item)
    if own is None:
        assert idem_key is not None
        return Claim.of(f"{idem_key}\x00{index}", "batch", workspace, asked)
    try:
        return Claim.of(valid_key(own), "batch-item", workspace, asked)
    except InvalidKey:
        return ItemResult(index=index, ok=False, error="invalid", detail="idempotency_key: 1-255 printable ASCII")


def replayed(index: int, claim: Claim, first: Answer) -> ItemResult:
    if first.fingerprint != claim.fingerprint:
        return ItemResult(index=index, ok=False, error="idempotency_key_reused", detail=REUSED)
    return ItemResult(index=index, **orjson.loads(first.body))


def _known(seen: object, candidate: str) -> bool:
    """The fingerprint was already mapped to another visitor (our SET NX lost)."""
    return isinstance(seen, bytes) and seen.decode() != candidate


def item_envelope(
    index: int,
    p: BaseModel,
    workspace: str,
    by_code: dict[str, links.LinkInfo | None],
    by_click: dict[str, clicks.ClickRef | None],
    candidates: dict[str, str],
    seen: dict[str, Any],
) -> tuple[Envelope | None, ItemResult]:
    if isinstance(p, RefportSale):
        e = sale.envelope(Dialect.NATIVE, workspace, sale.from_refport(p))
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    if isinstance(p, RefportLead):
        click = by_click.get(p.clickId)
        if click is None or click.workspace_id != workspace:
            return None, ItemResult(index=index, ok=False, error="invalid_click_id")
        payload: dict[str, Any] = {
            "code": click.code,
            "click_id": click.click_id,
            "visitor_id": click.visitor_id,
            "name": p.eventName,
            "external_id": p.customerExternalId,
        }
        for field, value in (
            ("email", p.customerEmail),
            ("customer_name", p.customerName),
            ("avatar", p.customerAvatar),
            ("metadata", p.metadata),
        ):
            if value is not None:
                payload[field] = value
        e = Envelope(type=EventType.LEAD, dialect=Dialect.NATIVE, workspace_id=workspace, payload=payload)
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    code = p.ref if isinstance(p, BatchClick) else p.code  # type: ignore[attr-defined]
    link = by_code.get(code)
    if link is None or link.workspace_id != workspace or not link.active:
        return None, ItemResult(index=index, ok=False, error="link_not_found")
    if isinstance(p, BricqsConvert):
        payload = {"code": code, "visitor_id": p.referred_session_id, "dedupe": f"{code}:{p.referred_session_id}"}
        e = Envelope(type=EventType.CONVERSION, dialect=Dialect.NATIVE, workspace_id=workspace, payload=payload)
        return e, ItemResult(index=index, ok=True, event_id=str(e.event_id))
    assert isinstance(p, BatchClick)
    if p.visitor_id:
        visitor, method = p.visitor_id, "cookie"
    elif p.fingerprint and _known(seen.get(p.fingerprint), candidates[p.fingerprint]):
        visitor, method = seen[p.fingerprint].decode(), "fingerprint"
    else:
        visitor, method = candidates.get(p.fingerprint or "", None) or new_visitor_id(), "new"
    payload = {"code": code, "visitor_id": visitor, "match": method}
    if p.url:
        payload["page_url"] = p.url
    if p.referrer:
        payload["referrer"] = p.referrer
    e = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.NATIVE,
        workspace_id=workspace,
        payload=payload,
        ip=p.ip,
        user_agent=p.user_agent,
    )
    confidence = {"cookie": 1.0, "fingerprint": FINGERPRINT_CONFIDENCE}.get(method, 0.0)
    return e, ItemResult(
        index=index,
        ok=True,
        event_id=str(e.event_id),
        visitor_id=visitor,
        match_method=method,
        match_confidence=confidence,
    )
