"""Refport's routes in ``/openapi.json`` (seed 004): a lead, a sale, a refund."""

from __future__ import annotations

from ingest.edge import bodies, refund, sale
from ingest.edge.routes import refport
from ingest.host.openapi.common import BODY, Op, errors

R = refport.RefportError

LEAD = Op(
    "post",
    "/api/track/lead",
    "Track a lead (Refport, seed 004; Dub's API: its fields, modes and quantities, its SDKs)",
    "Refport",
    {200: refport.RefportLeadTracked, **errors(R, 401, 429, 503, *BODY)},
    bodies.TrackLead,
    "bearer",
)

SALE = Op(
    "post",
    "/api/track/sale",
    "Track a sale (Refport): attributed to the customer's lead; an invoice counts once, a repeat answered as the first",
    "Refport",
    {200: refport.RefportSaleTracked, **errors(R, 401, 422, 429, 503, *BODY)},
    sale.TrackSale,
    "bearer",
)

REFUND = Op(
    "post",
    "/api/track/refund",
    "Refund a sale (Refport), in full or in part: a row of its own, idempotent on "
    "its refundId (or Idempotency-Key), never past the sale's amount (409)",
    "Refport",
    {200: refund.RefundRecorded, **errors(R, 401, 404, 409, 422, 429, 503, *BODY)},
    refund.RefportRefund,
    "bearer",
)
