"""A refund, the same on every route that takes one: Refport's ``POST /api/track/refund``
and the batch route's type ``refund``.

A refund names its sale's ``invoiceId``, and takes an amount (in the sale's currency's
minor unit; none: all that is left of the sale), a ``refundId`` and a ``reason``. Unlike
the events it is not stored by the workers: its answer depends on the refunds before it
(the refunded total may never pass the sale's amount: 409), so the edge records it in
Postgres at once (``ingest.ledger.refunds``): 200 once committed, 503 when Postgres cannot
say (``Refstream-Outcome: unknown`` when its commit's outcome is unknown: a retry with the
same ``refundId`` or ``Idempotency-Key`` is answered as the first, never refunded twice).

Before each 2xx (the first answer and every repeat's) the edge appends a copy of the
refund as recorded to its invoice's stream partition, the sale's (``copy``; the spool when
Redis cannot take it, as for an event), so the archive holds it and a replay into a
database that lacks it restores it, once, by its key (``workers.consumer.refunds``). A copy
neither Redis nor the spool took is logged (``refund.copy_unkept``) and the refund, recorded
all the same, is answered 503 with ``Refstream-Outcome: unknown``: the retry with its key is
answered as the first, and appends the copy again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ingest.contract.connections import PG_ERRORS, acquired
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.events import Envelope, EventType
from ingest.contract.fields import MAX_AMOUNT, NoNul, OptionalRecordId, RecordId, json_integer
from ingest.edge import enqueue
from ingest.edge.resolve import pool_of
from ingest.edge.state import Edge
from ingest.ledger import refunds
from ingest.ledger.placement import Moved

log = structlog.get_logger("ingest.refund")

KEY_NEEDED = "a refund needs a refundId or an Idempotency-Key (else its retry could be paid twice)"


class RefportRefund(BaseModel):
    """A refund of a sale (and the batch route's ``refund`` item)."""

    model_config = ConfigDict(extra="ignore")
    invoiceId: RecordId = Field(min_length=1, max_length=256, description="The refunded sale's invoiceId")
    # the bounds before the JSON-integer check, so the document shows them inside the union
    amount: Annotated[int, Field(ge=1, le=MAX_AMOUNT), BeforeValidator(json_integer)] | None = Field(
        None, description="In the sale's currency's minor unit; none: all that is left of the sale"
    )
    refundId: OptionalRecordId = Field(None, min_length=1, max_length=256, description="Your id of the refund: its key")
    reason: NoNul | None = Field(None, max_length=512)


class RefundRecorded(BaseModel):
    """A refund as recorded: the answer to it and to each repeat of its key."""

    refund_id: str
    sale_event_id: str
    invoice_id: str
    amount: int
    currency: str
    reason: str | None
    created_at: str


class Outcome(BaseModel):
    """What ``record`` answers: the refund, or why not (``status``, ``code``, ``message``)."""

    status: int
    code: str = ""
    message: str = ""
    refund: dict[str, Any] | None = None
    replayed: bool = False
    unknown: bool = False  # a 503 whose commit may have happened


async def record(edge: Edge, workspace_id: str, body: RefportRefund, idem_key: str | None, dialect: str) -> Outcome:
    """Record ``body``'s refund for the workspace: the outcome, never an exception."""
    try:
        asked = refunds.Asked.keyed(
            workspace_id,
            body.refundId,
            idem_key,
            invoice_id=body.invoiceId,
            amount=body.amount,
            reason=body.reason,
            dialect=dialect,
        )
    except ValueError:
        return Outcome(status=422, code="refund_key_required", message=KEY_NEEDED)
    try:
        async with edge.shards.writing(workspace_id), acquired(await pool_of(edge, workspace_id)) as conn:
            done = await refunds.record(conn, asked)  # a move's fence waits for it
    except refunds.SaleNotFound as exc:
        return Outcome(status=404, code="sale_not_found", message=f"{exc} (a sale still on its way is not found yet)")
    except refunds.RefundTooLarge as exc:
        return Outcome(status=409, code="refund_exceeds_sale", message=str(exc))
    except refunds.KeyReused as exc:
        return Outcome(status=422, code="idempotency_key_reused", message=str(exc))
    except (Moved, *PG_ERRORS, asyncpg.InterfaceError, asyncpg.PostgresError) as exc:
        unknown = isinstance(exc, OutcomeUnknown)  # a commit in flight: may be recorded
        return Outcome(status=503, code="unavailable", message="Try again shortly", unknown=unknown)
    if not await copy(edge, asked, done.row):
        return Outcome(status=503, code="unavailable", message="Try again shortly", unknown=True)
    return Outcome(status=200, refund=done.row, replayed=not done.made)


def envelope(asked: refunds.Asked, row: dict[str, Any]) -> Envelope:
    """The stream copy of the refund ``row`` that ``asked`` made (or was answered with):
    what a restore needs to record it again as it is, the fields of its Postgres row (an
    ``Idempotency-Key`` only as the row keeps it, digested)."""
    payload = {
        "invoice": row["invoice_id"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reason": row["reason"],
        "refund_key": asked.key,
        "fingerprint": asked.fingerprint,
        "created_at": row["created_at"],
    }
    at_ms = int(datetime.fromisoformat(row["created_at"]).timestamp() * 1000)
    return Envelope(
        EventType.REFUND,
        asked.dialect,
        payload,
        asked.workspace_id,
        event_id=UUID(row["refund_id"]),
        received_at_ms=at_ms,
    )


async def copy(edge: Edge, asked: refunds.Asked, row: dict[str, Any]) -> bool:
    """Append the refund's stream copy (``envelope``): False, and logged, when neither Redis
    nor the spool kept it."""
    env = envelope(asked, row)
    route = env.routing_key()
    assert route is not None  # a refund always names its invoice
    try:
        await enqueue.append(edge, env, route, spool=True)
    except (NotSent, OutcomeUnknown, Outage) as exc:  # neither Redis nor the spool kept it
        log.warning("refund.copy_unkept", refund_id=row["refund_id"], error=exc)
        return False
    return True
