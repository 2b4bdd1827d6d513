"""End to end with real processes: `refstream serve` and `refstream work`, HTTP in,
Postgres out."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import orjson

from ingest.contract.keys import GROUP, Keys

from ._procs import Procs
from ._world import BROWSER

TRACKED = {"success": True, "data": {"tracked": True}}


async def fire(base: str, codes: list[str], concurrency: int = 32) -> list[tuple[int, object]]:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:

        async def one(code: str) -> tuple[int, object]:
            async with sem, http.post(f"{base}/api/v1/referral/click/{code}") as r:
                return r.status, orjson.loads(await r.read())

        return await asyncio.gather(*(one(c) for c in codes))


async def test_clicks_reach_the_link_counter_and_nothing_else(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    assert ws["api_key"].startswith("rs_live_")
    alice = await procs.cli(
        "link", "create", "--workspace", ws["workspace_id"], "--code", "alice", "--url", "https://acme.test/pricing"
    )
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "bob")
    assert alice["clicks"] == 0

    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="100000")
    procs.start("work")
    n, ghosts = 240, [f"ghost-{i}" for i in range(25)]
    replies = await fire(base, ["alice"] * n + ghosts)
    assert all(r == (200, TRACKED) for r in replies), replies[:3]

    await procs.cli("work", "--drain")  # returns once every partition is read and acked
    for stream in keys.streams:
        (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
        assert group["pending"] == 0

    shown = await procs.cli("link", "show", "alice")
    assert shown["clicks"] == n
    assert shown["last_clicked_at"] is not None
    bob = await procs.cli("link", "show", "bob")
    assert (bob["clicks"], bob["leads"], bob["conversions"]) == (0, 0, 0)
    assert await pg.fetchval("SELECT count(*) FROM events") == n
    assert await pg.fetchval("SELECT count(DISTINCT link_id) FROM events") == 1
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats") == n
    assert await pg.fetchval("SELECT count(*) FROM customers") == 0
    ips = await pg.fetchval("SELECT array_agg(DISTINCT host(ip)) FROM events")
    assert ips == ["127.0.0.1"]
