"""Dub's API at its own paths in ``/openapi.json``: a lead, a sale, a browser's click."""

from __future__ import annotations

from ingest.edge import bodies, dub_shapes, sale
from ingest.edge.routes import dub
from ingest.host.openapi.common import BODY, Op, errors

DE = dub_shapes.DubError

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/track/lead",
        "Track a lead (Dub's API, at its path): attributed to its click, or (clickId empty) to the customer's"
        " earlier one; mode deferred records the click for a later lead; eventQuantity counts it N times",
        "Dub",
        {200: dub_shapes.TrackLeadAnswer, **errors(DE, 401, 403, 404, 422, 429, 503, *BODY)},
        bodies.TrackLead,
        "bearer",
    ),
    Op(
        "post",
        "/track/sale",
        "Track a sale (Dub's API, at its path): attributed to the customer's lead; with clickId, tracked"
        " directly (the customer's lead made from the click); an invoice counts once",
        "Dub",
        {200: dub_shapes.TrackSaleAnswer, **errors(DE, 401, 403, 404, 422, 429, 503, *BODY)},
        sale.TrackSale,
        "bearer",
    ),
    Op(
        "post",
        "/track/click",
        "Track a click from a browser (Dub's API, at its path): the link by domain and key; allowed by the"
        " workspace's allowed hostnames (Origin, else Referer); a browser's repeat within the hour gets its"
        " first clickId",
        "Dub",
        {200: dub_shapes.TrackClickAnswer, **errors(DE, 403, 404, 422, 429, 503, *BODY)},
        dub.DubClick,
    ),
)
