"""Server-side attribution window: a lead whose click is older than the program's cookie
window is stored, flagged out of window, and credited to nobody."""

from __future__ import annotations

import time

import asyncpg

from ingest.contract import clicks
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from workers.consumer.store import write_batch

from ._world import make_world

DAY_MS = 86_400_000


def lead(code: str, workspace: str, clicked_days_ago: float, external_id: str) -> Envelope:
    now = int(time.time() * 1000)
    click_id = clicks.mint(uuid7(ms=now - int(clicked_days_ago * DAY_MS)))
    return Envelope(
        type=EventType.LEAD,
        dialect=Dialect.REFPORT,
        workspace_id=workspace,
        received_at_ms=now,
        payload={
            "code": code,
            "click_id": click_id,
            "visitor_id": click_id,
            "name": "Sign Up",
            "external_id": external_id,
        },
    )


async def test_a_lead_after_the_cookie_window_is_stored_not_credited(pg: asyncpg.Pool, redis, keys: Keys):
    world = await make_world(pg, redis, keys)  # its program's cookie window: 60 days
    result = await write_batch(
        pg, [lead("PARTNER123", world.workspace_id, 61, "late"), lead("PARTNER123", world.workspace_id, 59, "on_time")]
    )
    assert result.inserted == 2
    rows = {r["customer_external_id"]: r["out_of_window"] for r in await pg.fetch("SELECT * FROM events")}
    assert rows == {"late": True, "on_time": False}
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'PARTNER123'") == 1
    assert await pg.fetchval("SELECT leads FROM daily_stats") == 1
    assert [r["external_id"] for r in await pg.fetch("SELECT external_id FROM customers")] == ["on_time"]
