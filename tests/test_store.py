"""The batch transaction against a real Postgres: idempotent, exact under concurrency."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import structlog

from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.manage import admin
from workers.consumer.store import write_batch


def clicks(code: str, n: int, ms: int | None = None) -> list[Envelope]:
    at: dict[str, Any] = {"received_at_ms": ms} if ms else {}  # else the envelope's own clock
    return [
        Envelope(
            type=EventType.CLICK,
            dialect=Dialect.BIORE,
            payload={"code": code},
            ip="203.0.113.7",
            **at,
        )
        for _ in range(n)
    ]


async def make_links(pg: asyncpg.Pool, redis, keys: Keys, *codes: str) -> str:
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, "T")
        for code in codes:
            await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code=code)
    return ws["workspace_id"]


async def counters(pg: asyncpg.Pool) -> dict[str, int]:
    return {r["code"]: r["clicks"] for r in await pg.fetch("SELECT code, clicks FROM links")}


async def test_a_batch_written_twice_counts_once(pg: asyncpg.Pool, redis, keys: Keys):
    await make_links(pg, redis, keys, "a", "b")
    batch = clicks("a", 7) + clicks("b", 3) + clicks("nobody", 2)
    first = await write_batch(pg, batch)
    assert (first.inserted, first.duplicates, sorted(first.unknown_codes)) == (10, 0, ["nobody", "nobody"])
    again = await write_batch(pg, list(reversed(batch)))
    assert (again.inserted, again.duplicates) == (0, 10)
    assert await counters(pg) == {"a": 7, "b": 3}
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats") == 10


async def test_last_clicked_at_only_moves_forward(pg: asyncpg.Pool, redis, keys: Keys):
    await make_links(pg, redis, keys, "a")
    await write_batch(pg, clicks("a", 1, ms=1_800_000_000_000))
    await write_batch(pg, clicks("a", 1, ms=1_700_000_000_000))  # older, processed later
    row = await pg.fetchrow("SELECT clicks, extract(epoch FROM last_clicked_at)::bigint AS t FROM links")
    assert (row["clicks"], row["t"]) == (2, 1_800_000_000)
    days = await pg.fetch("SELECT day, clicks FROM daily_stats ORDER BY day")
    assert [d["clicks"] for d in days] == [1, 1] and days[0]["day"] < days[1]["day"]


async def test_inactive_links_count_nothing(pg: asyncpg.Pool, redis, keys: Keys):
    await make_links(pg, redis, keys, "a")
    await pg.execute("UPDATE links SET status = 'inactive'")
    result = await write_batch(pg, clicks("a", 3))
    assert (result.inserted, result.inactive_codes) == (0, ["a", "a", "a"])
    assert await counters(pg) == {"a": 0}
    assert await pg.fetchval("SELECT count(*) FROM events") == 0


async def test_concurrent_overlapping_batches_are_exact_and_never_deadlock(pg: asyncpg.Pool, redis, keys: Keys):
    codes = [f"hot{i}" for i in range(6)]
    await make_links(pg, redis, keys, *codes)
    rng = random.Random(7)
    batches = []
    for _ in range(16):
        batch = [e for c in codes for e in clicks(c, rng.randint(1, 20))]
        rng.shuffle(batch)
        batches.append(batch)
    with structlog.testing.capture_logs() as logs:
        # each batch twice, all at once: redelivery racing the first delivery
        results = await asyncio.gather(*(write_batch(pg, b) for b in batches + batches))
    expected: dict[str, int] = {c: 0 for c in codes}
    for b in batches:
        for e in b:
            expected[e.payload["code"]] += 1
    assert await counters(pg) == expected
    assert sum(r.inserted for r in results) == sum(expected.values())
    assert sum(r.duplicates for r in results) == sum(expected.values())
    assert [entry for entry in logs if entry["event"] == "batch.retry"] == []
