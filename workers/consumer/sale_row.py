"""A sale's row as ``workers.consumer.sales`` inserts it (``SaleRow.values``), and its
``sale.created`` notice (``SaleRow.notice``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ingest.contract.events import Envelope
from ingest.ledger.outbox import WebhookEvent

UNATTRIBUTED = "no_lead"


@dataclass(slots=True)
class SaleRow:
    envelope: Envelope
    at: datetime
    lead: asyncpg.Record | None = None

    def values(self) -> tuple[Any, ...]:
        p, lead = self.envelope.payload, self.lead
        return (
            self.envelope.event_id,
            self.envelope.workspace_id,
            as_text(p.get("invoice")),
            p["external_id"],
            p["amount"],
            p["currency"],
            p["name"],
            p["processor"],
            as_text(p.get("lead_name")),
            lead["event_id"] if lead else None,
            lead["click_id"] if lead else None,
            lead["link_id"] if lead else None,
            lead["affiliate_id"] if lead else None,
            lead["program_id"] if lead else None,
            None if lead else UNATTRIBUTED,
            self.envelope.dialect,
            self.at,
            p.get("metadata"),
        )

    def notice(self) -> WebhookEvent:
        """``sale.created``: the sale as stored; its link as attributed then (null: none yet)."""
        e, lead, p = self.envelope, self.lead, self.envelope.payload
        link = (
            {
                "id": str(lead["link_id"]),
                "program_id": _str(lead["program_id"]),
                "affiliate_id": _str(lead["affiliate_id"]),
            }
            if lead
            else None
        )
        data = {
            "event_id": str(e.event_id),
            "received_at": self.at.isoformat(),
            "invoice_id": as_text(p.get("invoice")),
            "customer": {"external_id": p["external_id"]},
            "amount": p["amount"],
            "currency": p["currency"],
            "event_name": p["name"],
            "payment_processor": p["processor"],
            "link": link,
            "lead_event_id": _str(lead["event_id"]) if lead else None,
        }
        return WebhookEvent(e.workspace_id or "", "sale.created", e.event_id, "", data)


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def as_text(v: object) -> str | None:
    return v if isinstance(v, str) else None
