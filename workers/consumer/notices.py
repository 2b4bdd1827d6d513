"""What a batch tells webhooks: lead.created, conversion.created, milestone.reached, built
from the events it newly inserted (never test-mode ones), so a redelivery notifies nothing."""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.contract.events import EventType
from ingest.ledger.outbox import WebhookEvent
from workers.consumer.counters import MilestoneReached
from workers.consumer.stored import Stored

_MILESTONE_NAMES = "SELECT id, name, threshold FROM milestones WHERE id = ANY($1::uuid[])"


def _link(s: Stored) -> dict[str, Any]:
    return {"id": s.link.id, "code": s.link.code, "program_id": s.link.program_id, "affiliate_id": s.link.affiliate_id}


# the notice an event's type makes (a click makes none)
TYPE_OF = {EventType.LEAD: "lead.created", EventType.CONVERSION: "conversion.created"}


def for_events(events: list[Stored]) -> list[WebhookEvent]:
    out = []
    for s in events:
        if s.type not in TYPE_OF:
            continue
        common = {"event_id": str(s.envelope.event_id), "received_at": s.at.isoformat(), "link": _link(s)}
        if s.type is EventType.LEAD:
            data = {
                **common,
                "event_name": s.text("name"),
                "click_id": s.text("click_id"),
                "customer": {
                    "external_id": s.text("external_id"),
                    "email": s.text("email"),
                    "name": s.text("customer_name"),
                },
            }
            out.append(WebhookEvent(s.link.workspace_id, "lead.created", s.envelope.event_id, "", data))
        elif s.type is EventType.CONVERSION:
            data = {**common, "conversion_id": s.text("conversion_id"), "visitor_id": s.text("visitor_id")}
            out.append(WebhookEvent(s.link.workspace_id, "conversion.created", s.envelope.event_id, "", data))
    return out


async def for_milestones(
    conn: asyncpg.Connection, events: list[Stored], reached: list[MilestoneReached]
) -> list[WebhookEvent]:
    if not reached:
        return []
    names = {r["id"]: r for r in await conn.fetch(_MILESTONE_NAMES, sorted({m.milestone_id for m in reached}))}
    workspace = {s.link.affiliate_id: s.link.workspace_id for s in events if s.link.affiliate_id}
    out = []
    for m in reached:
        row = names[m.milestone_id]
        data = {
            "affiliate_id": str(m.affiliate_id),
            "milestone_id": str(m.milestone_id),
            "name": row["name"],
            "threshold": row["threshold"],
            "reached_at": m.reached_at.isoformat(),
        }
        out.append(
            WebhookEvent(workspace[str(m.affiliate_id)], "milestone.reached", m.milestone_id, str(m.affiliate_id), data)
        )
    return out
