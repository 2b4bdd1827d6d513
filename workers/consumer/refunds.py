"""Refunds' stream copies: what the archive and a replay carry of a refund, restored once.

The edge records a refund in Postgres itself (``ingest.ledger.refunds``: its answer depends
on the refunds before it) and then appends a copy of the refund as recorded to its sale's
partition (``ingest.edge.refund.copy``). A worker reading a copy looks its key up: where
the refund is recorded, which is every time but after a restore of Postgres that lacks it,
the copy is a duplicate and moves nothing. Where it is not, it is recorded again as the
edge recorded it (its id, its time, its amount, its key and what its request asked), in a
transaction of its own after the batch's, by the edge's own code: under the sale's row
lock, with its stats, clawbacks and webhooks. Exactly once: the key is unique, so a copy
read twice, a spooled copy beside a streamed one, or a second replay records nothing.

A copy that cannot be restored, because its sale is not in Postgres (a replay that began
after the sale's entry, or reads the sale's partition after the copy's: a change of the
partition count between the two puts them apart) or the sale's refunds would pass its
amount, is logged (``refund.not_restored``) and handed back in the batch's result: a replay
tries those again once it has read every partition (``workers.ops.replay``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import structlog

from ingest.contract.events import Envelope
from ingest.ledger import refunds
from workers.consumer.stored import ts
from workers.group.errors import retried_in_place

log = structlog.get_logger("workers.refunds")


@dataclass(slots=True)
class Restored:
    restored: int = 0  # recorded again (Postgres lacked them)
    duplicates: int = 0  # recorded already: the usual case
    not_restored: list[Envelope] = field(default_factory=list)  # their sale is missing, or they would pass it


def asked(e: Envelope) -> refunds.Asked:
    """The refund request a copy stands for, with what its first request asked."""
    p = e.payload
    if e.workspace_id is None:
        raise ValueError("a refund's copy without its workspace")
    return refunds.Asked(
        e.workspace_id,
        str(p["refund_key"]),
        invoice_id=str(p["invoice"]),
        amount=int(p["amount"]),
        reason=p.get("reason"),
        dialect=e.dialect,
        asked_as=str(p["fingerprint"]),
    )


def _at(e: Envelope) -> datetime:
    """When the edge recorded it, to the microsecond as Postgres keeps it."""
    at = e.payload.get("created_at")
    return datetime.fromisoformat(at) if isinstance(at, str) else ts(e.received_at_ms)


async def restore(pool: asyncpg.Pool, copies: list[Envelope]) -> Restored:
    """Record each copy whose refund Postgres lacks, in event-id order, each in its own
    transaction (``refunds.record``'s); the others are duplicates."""
    out = Restored()
    for e in sorted(copies, key=lambda e: e.event_id):
        try:
            done = await _record(pool, e)
        except (refunds.SaleNotFound, refunds.RefundTooLarge, refunds.KeyReused) as exc:
            out.not_restored.append(e)
            log.warning("refund.not_restored", refund_id=str(e.event_id), why=type(exc).__name__)
            continue
        if done.made:
            out.restored += 1
            log.info("refund.restored", refund_id=str(e.event_id))
        else:
            out.duplicates += 1
    return out


async def _record(pool: asyncpg.Pool, e: Envelope) -> refunds.Refunded:
    async def run() -> refunds.Refunded:
        async with pool.acquire() as conn:  # a replay's dry run: its one connection
            return await refunds.record(conn, asked(e), refund_id=e.event_id, at=_at(e))

    return await retried_in_place(run, "refund")
