"""bio.re's routes in ``/openapi.json`` (seed 000)."""

from __future__ import annotations

from ingest.edge.routes import biore
from ingest.host.openapi.common import BODY, Op, errors

X = biore.BioreError

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/api/v1/referral/click/{code}",
        "Track a referral click (bio.re, seed 000); no body (one sent "
        "anyway is capped: 413); an Origin the workspace does not allow: 403",
        "bio.re",
        {200: biore.BioreTrackResponse, **errors(X, 403, 429, 503, *BODY)},
    ),
)
