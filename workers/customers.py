"""Customers: one per (workspace, visitor), upserted from a batch's new events.

First-touch attribution comes from the earliest event, contact details from the latest,
status only rises (1 click < 2 lead < 3 converted), first/last seen use LEAST/GREATEST:
the same customer whatever order the events are processed in.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.events import EventType

from .stored import Stored

_UPSERT = """
INSERT INTO customers AS c (workspace_id, visitor_id, link_id, affiliate_id, program_id, first_click_id,
                            external_id, email, name, avatar_url, status, first_seen_at, last_seen_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::uuid[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::smallint[],
                     $12::timestamptz[], $13::timestamptz[])
ORDER BY 1, 2
ON CONFLICT (workspace_id, visitor_id) DO UPDATE SET
    link_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at THEN EXCLUDED.link_id ELSE c.link_id END,
    affiliate_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at
                        THEN EXCLUDED.affiliate_id ELSE c.affiliate_id END,
    program_id = CASE WHEN EXCLUDED.first_seen_at < c.first_seen_at THEN EXCLUDED.program_id ELSE c.program_id END,
    first_click_id = CASE WHEN c.first_click_id IS NULL
                            OR (EXCLUDED.first_click_id IS NOT NULL AND EXCLUDED.first_seen_at < c.first_seen_at)
                          THEN EXCLUDED.first_click_id ELSE c.first_click_id END,
    external_id = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at
                       THEN coalesce(EXCLUDED.external_id, c.external_id)
                       ELSE coalesce(c.external_id, EXCLUDED.external_id) END,
    email = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.email, c.email)
                 ELSE coalesce(c.email, EXCLUDED.email) END,
    name = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.name, c.name)
                ELSE coalesce(c.name, EXCLUDED.name) END,
    avatar_url = CASE WHEN EXCLUDED.last_seen_at >= c.last_seen_at THEN coalesce(EXCLUDED.avatar_url, c.avatar_url)
                      ELSE coalesce(c.avatar_url, EXCLUDED.avatar_url) END,
    status = GREATEST(c.status, EXCLUDED.status),
    first_seen_at = LEAST(c.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(c.last_seen_at, EXCLUDED.last_seen_at)
"""

_CONTACT = (("external_id", "external_id"), ("email", "email"), ("name", "customer_name"), ("avatar", "avatar"))


async def upsert(conn: asyncpg.Connection, events: list[Stored]) -> None:
    """The batch is merged per (workspace, visitor) first: one INSERT may not touch a row twice.
    Events without a visitor (seed 000 clicks) and bot clicks make no customer."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sorted(events, key=lambda s: s.at):
        visitor = s.text("visitor_id")
        if visitor is None or (s.is_bot and s.type is EventType.CLICK):
            continue
        c = merged.setdefault(
            (s.link.workspace_id, visitor),
            {"link": s.link, "first_click": None, "status": 0, "first": s.at, "last": s.at,
             "external_id": None, "email": None, "name": None, "avatar": None},
        )  # fmt: skip
        c["last"] = s.at
        c["status"] = max(c["status"], int(s.type))
        if s.type is EventType.CLICK and c["first_click"] is None:
            c["first_click"] = s.envelope.event_id
        for attr, key in _CONTACT:
            if (value := s.text(key)) is not None:
                c[attr] = value
    if not merged:
        return
    keys = sorted(merged)
    rows = [merged[k] for k in keys]
    await conn.execute(
        _UPSERT,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [r["link"].id for r in rows],
        [r["link"].affiliate_id for r in rows],
        [r["link"].program_id for r in rows],
        [r["first_click"] for r in rows],
        [r["external_id"] for r in rows],
        [r["email"] for r in rows],
        [r["name"] for r in rows],
        [r["avatar"] for r in rows],
        [r["status"] for r in rows],
        [r["first"] for r in rows],
        [r["last"] for r in rows],
    )
