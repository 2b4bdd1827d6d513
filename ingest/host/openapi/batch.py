"""The batch route in ``/openapi.json``: many events, each as its single-event route."""

from __future__ import annotations

from ingest.edge.routes import batch
from ingest.host.openapi.common import BODY, Op, errors
from ingest.manage.routes._guard import ManageError

OPERATIONS: tuple[Op, ...] = (
    Op(
        "post",
        "/v1/events/batch",
        "Up to 500 events in one request (JSON array or NDJSON, gzip accepted), each "
        "validated like its single-event route; one result per event, a bad event never fails the others",
        "Batch",
        {200: batch.BatchResult, **errors(ManageError, 401, 403, 429, 503, *BODY)},
        batch.BatchBody,
        "bearer",
    ),
)
