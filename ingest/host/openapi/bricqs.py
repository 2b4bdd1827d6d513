"""Bricqs' routes in ``/openapi.json`` (seed 001): its codes generated, validated, converted, and
a participant's statistics.
"""

from __future__ import annotations

from ingest.edge import bodies
from ingest.edge.routes import bricqs
from ingest.host.openapi.common import BODY, Op, errors
from ingest.manage.routes import bricqs as bricqs_manage

B = bricqs.BricqsError

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/api/v1/referrals/generate",
        "Generate a referral code (Bricqs, seed 001)",
        "Bricqs",
        {200: bricqs_manage.BricqsGenerated, **errors(B, 401, 403, 404, 429, 503, *BODY)},
        bricqs_manage.BricqsGenerate,
        "apiKey",
    ),
    Op(
        "get",
        "/api/v1/referrals/validate/{code}",
        "Validate a referral code",
        "Bricqs",
        {200: bricqs.BricqsValidated, **errors(B, 429, 503)},
    ),
    Op(
        "post",
        "/api/v1/referrals/convert",
        "Convert a referral",
        "Bricqs",
        {200: bricqs.BricqsConverted, **errors(B, 403, 404, 429, 503, *BODY)},
        bodies.BricqsConvert,
    ),
    Op(
        "get",
        "/api/v1/referrals/stats/{participant_id}",
        "Referral statistics of a participant",
        "Bricqs",
        {200: bricqs_manage.BricqsStats, **errors(B, 401, 403, 404, 429, 503)},
        security="apiKey",
    ),
)
