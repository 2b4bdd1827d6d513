"""Every table that grows with traffic has a retention, run by the partition maintenance:
old rows go, recent rows stay (event_flags, event_drops, webhook_deliveries with their
webhook_attempts, affiliate_ips). schema.sql states every table's bound."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from ingest.contract.events import uuid7
from ingest.contract.keys import Keys
from workers.consumer.partitions import maintain

from ._world import make_world

TODAY = date(2033, 6, 1)
RETENTION = 30  # days: the horizon is 2033-05-02
WEBHOOK_DAYS = 30  # REFSTREAM_WEBHOOK_RETENTION_DAYS's default


def at(days_ago: int) -> datetime:
    return datetime.combine(TODAY, datetime.min.time(), UTC) - timedelta(days=days_ago) + timedelta(hours=12)


def event_id(days_ago: int) -> Any:
    return uuid7(int(at(days_ago).timestamp() * 1000))


async def test_old_rows_go_and_recent_rows_stay(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    world = await make_world(pg, redis, keys, code="A")
    link = world.link["id"]
    ages = {"old": RETENTION + 5, "recent": RETENTION - 5}
    for name, age in ages.items():
        await pg.execute(
            "INSERT INTO event_flags (event_id, rule, workspace_id, link_id, type, excluded, received_at)"
            " VALUES ($1, $2, $3, $4, 1, false, $5)",
            event_id(age),
            name,
            world.workspace_id,
            link,
            at(age),
        )
        await pg.execute(
            "INSERT INTO event_drops (event_id, workspace_id, link_id, reason, received_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            event_id(age),
            world.workspace_id,
            link,
            name,
            at(age),
        )
    await pg.execute(
        "INSERT INTO affiliate_ips (affiliate_id, ip, first_seen, last_seen) VALUES"
        " ($1, '10.0.0.1', $2, $2), ($1, '10.0.0.2', $2, $3)",
        world.affiliate_id,
        at(RETENTION + 50),
        at(RETENTION - 5),
    )
    hook = await pg.fetchval(
        "INSERT INTO webhooks (workspace_id, url, secret_encrypted, secret_prefix)"
        " VALUES ($1, 'https://hooks.test/', '\\x00', 'whsec_') RETURNING id",
        world.workspace_id,
    )
    deliveries = {}
    for name, status, age in [
        ("old delivered", "delivered", WEBHOOK_DAYS + 5),
        ("old failed", "failed", WEBHOOK_DAYS + 5),
        ("old pending", "pending", WEBHOOK_DAYS + 5),  # not finished: kept until it is
        ("recent delivered", "delivered", WEBHOOK_DAYS - 5),
    ]:
        deliveries[name] = await pg.fetchval(
            "INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, payload, status, created_at)"
            " VALUES ($1, 'lead.created', gen_random_uuid(), '{}', $2, $3) RETURNING id",
            hook,
            status,
            at(age),
        )
        await pg.execute("INSERT INTO webhook_attempts (delivery_id, attempt) VALUES ($1, 1)", deliveries[name])

    done = await maintain(pg, retention_days=RETENTION, dedupe_days=RETENTION, today=TODAY)
    assert done.refused is None
    assert [r[0] for r in await pg.fetch("SELECT rule FROM event_flags")] == ["recent"]
    assert [r[0] for r in await pg.fetch("SELECT reason FROM event_drops")] == ["recent"]
    assert [str(r[0]) for r in await pg.fetch("SELECT ip FROM affiliate_ips")] == ["10.0.0.2"]
    kept = {r[0] for r in await pg.fetch("SELECT id FROM webhook_deliveries")}
    assert kept == {deliveries["old pending"], deliveries["recent delivered"]}
    assert {r[0] for r in await pg.fetch("SELECT delivery_id FROM webhook_attempts")} == kept
    assert done.purged == {"event_flags": 1, "event_drops": 1, "webhook_deliveries": 2, "affiliate_ips": 1}

    again = await maintain(pg, retention_days=RETENTION, dedupe_days=RETENTION, today=TODAY)
    assert again.purged == {}
