"""Affixo's routes in ``/openapi.json`` (seed 003): a click and a conversion, server to server."""

from __future__ import annotations

from ingest.edge import bodies, sale
from ingest.edge.routes import affixo
from ingest.host.openapi.common import BODY, Op, errors

F = affixo.AffixoError

CLICK = Op(
    "post",
    "/v1/track/click",
    "Track a click, server to server (Affixo, seed 003)",
    "Affixo",
    {200: affixo.AffixoClickRecorded, **errors(F, 401, 403, 404, 429, 503, *BODY)},
    bodies.AffixoClick,
    "bearer",
)

CONVERSION = Op(
    "post",
    "/v1/track/conversion",
    "Track a conversion (a sale), server to server (Affixo): attributed to the "
    "customer's lead; an invoice counts once, a repeat answered as the first",
    "Affixo",
    {200: affixo.AffixoConversionRecorded, **errors(F, 401, 403, 422, 429, 503, *BODY)},
    sale.AffixoConversion,
    "bearer",
)
