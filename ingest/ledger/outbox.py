"""The webhook outbox: what a transaction tells webhooks, recorded in that transaction, so
a delivery is never lost between COMMIT and the job queue, and never made twice. The
workers record their batches' events here; the management API its own writes' (a payout
paid); ``workers.consumer.webhooks`` delivers every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import jsonrows

# every type a webhook may subscribe to
EVENT_TYPES = (
    "lead.created",
    "conversion.created",
    "milestone.reached",
    "fraud.flagged",
    "sale.created",
    "commission.created",
    "payout.paid",
    "refund.created",
)


@dataclass(slots=True)
class WebhookEvent:
    """Something a webhook can subscribe to; ``subject_id``/``subject_key`` identify it
    (the event id and ``""``; for ``milestone.reached`` the milestone and the affiliate)."""

    workspace_id: str
    event_type: str
    subject_id: UUID
    subject_key: str
    payload: dict[str, Any]


_DELIVERY_ROWS = jsonrows.table(
    ("uuid", "text", "uuid", "text", "jsonb"), "e (workspace_id, event_type, subject_id, subject_key, payload)"
)
_RECORD_DELIVERIES = f"""
INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, subject_key, payload)
SELECT w.id, e.event_type, e.subject_id, e.subject_key, e.payload
  FROM {_DELIVERY_ROWS}
  JOIN webhooks w ON w.workspace_id = e.workspace_id AND w.active AND e.event_type = ANY (w.events)
 ORDER BY w.id, e.event_type, e.subject_id, e.subject_key
ON CONFLICT (webhook_id, event_type, subject_id, subject_key) DO NOTHING
RETURNING id
"""


async def record_deliveries(conn: asyncpg.Connection, events: list[WebhookEvent]) -> list[str]:
    """Outbox rows for ``events``, inside the caller's transaction; the ids of the new rows.

    Set-based: one INSERT ... SELECT joins the events to the active webhooks of their
    workspace that subscribe to their type. Rows go in key order, so concurrent batches
    touching the same keys wait for each other instead of deadlocking.
    """
    if not events:
        return []
    # a payload is built by the worker from an event's fixed fields (text, numbers, its
    # link), never holding a client's document (no ``metadata``): its depth is ours, a few levels
    unique = {(e.workspace_id, e.event_type, e.subject_id, e.subject_key): e for e in events}
    rows = [unique[k] for k in sorted(unique, key=lambda k: (k[0], k[1], str(k[2]), k[3]))]
    ids = await conn.fetch(
        _RECORD_DELIVERIES,
        jsonrows.doc([(e.workspace_id, e.event_type, e.subject_id, e.subject_key, e.payload) for e in rows]),
    )
    return sorted(str(r["id"]) for r in ids)
