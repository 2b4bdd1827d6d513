"""Redelivery never double counts: a worker killed between COMMIT and XACK, and a range of
entries fed to the streams a second time."""

from __future__ import annotations

import asyncio

import asyncpg

from ingest.contract.keys import GROUP, Keys

from ._procs import Procs
from .test_e2e import TRACKED, fire


async def _setup(procs: Procs, n: int) -> None:
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="100000")
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * n))


async def _pending(redis, keys: Keys) -> int:
    total = 0
    for stream in keys.streams:
        for g in await redis.xinfo_groups(stream):
            if g["name"] == GROUP.encode():
                total += g["pending"]
    return total


async def test_worker_killed_after_commit_before_ack(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    n, batch = 50, 20
    await _setup(procs, n)

    # the victim commits its first batch of 20, then SIGKILLs itself before XACK
    victim = procs.start(
        "work",
        "--drain",
        failpoint="crash_after_commit",
        REFSTREAM_BATCH_SIZE=str(batch),
        REFSTREAM_CONSUMER_NAME="victim",
    )
    assert await asyncio.to_thread(victim.wait, 60) == -9
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == batch
    assert await _pending(redis, keys) == batch  # committed, never acked

    # a second worker claims the victim's entries once idle (1 s here) and finishes the rest
    totals = await procs.cli("work", "--drain", REFSTREAM_BATCH_SIZE=str(batch))
    assert totals["duplicates"] == batch
    assert totals["inserted"] == n - batch
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == n
    assert await pg.fetchval("SELECT count(*) FROM events") == n
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats") == n
    assert await _pending(redis, keys) == 0


async def test_the_same_range_fed_again_changes_nothing(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    n = 40
    await _setup(procs, n)
    first = await procs.cli("work", "--drain")
    assert first["inserted"] == n
    before = await pg.fetchrow("SELECT clicks, last_clicked_at FROM links WHERE code = 'alice'")
    assert before["clicks"] == n

    refed = 0
    for stream in keys.streams:
        for _, fields in await redis.xrange(stream):
            await redis.xadd(stream, fields)
            refed += 1
    assert refed == n

    again = await procs.cli("work", "--drain")
    assert (again["inserted"], again["duplicates"]) == (0, n)
    after = await pg.fetchrow("SELECT clicks, last_clicked_at FROM links WHERE code = 'alice'")
    assert after == before
    assert await pg.fetchval("SELECT count(*) FROM events") == n
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats") == n
