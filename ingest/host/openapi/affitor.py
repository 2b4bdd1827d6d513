"""Affitor's route in ``/openapi.json`` (seed 002)."""

from __future__ import annotations

from ingest.edge.routes import affitor
from ingest.host.openapi.common import BODY, Op, errors

A = affitor.AffitorFailure

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/api/v1/track/click",
        "Track an affiliate click (Affitor, seed 002)",
        "Affitor",
        {200: (affitor.AffitorClickResponse, affitor.AffitorTestModeResponse, A), **errors(A, 403, 429, 503, *BODY)},
        affitor.AffitorClick,
    ),
)
