"""Redis goes away under a running edge: public clicks are still accepted (into the spool),
authenticated routes answer 503; an edge restart loses nothing spooled; when Redis is back
the spool drains and the worker counts every click exactly once."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from ingest.settings import Settings

from ._procs import Procs
from ._redis import PrivateRedis
from ._world import BROWSER, call
from .conftest import wait_for


async def clicks(base: str, n: int) -> list[int]:
    return [
        (await call("POST", f"{base}/api/v1/referral/click/alice", headers={"User-Agent": BROWSER}))[0]
        for _ in range(n)
    ]


async def test_spool_through_a_redis_outage_and_an_edge_restart(
    settings: Settings, private_redis: PrivateRedis, pg: asyncpg.Pool, tmp_path: Path
):
    own = settings.model_copy(update={"redis_url": private_redis.url, "click_rate_limit": 1000})
    procs = Procs(own, tmp_path)
    spool = Path(own.spool_dir)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT="1000")
        procs.start("work")

        async def counted(n: int) -> bool:
            return await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == n

        assert await clicks(edge, 20) == [200] * 20
        await wait_for(lambda: counted(20), timeout=60, what="the first clicks")

        private_redis.kill()
        assert await clicks(edge, 30) == [200] * 30  # accepted: on disk before each 200
        status, out, headers = await call("POST", f"{edge}/v1/track/click", json={"ref": "alice"},
                                          headers={"Authorization": f"Bearer {ws['api_key']}"})  # fmt: skip
        assert (status, headers.get("Retry-After")) == (503, "1"), out
        assert sum(p.read_bytes().count(b"\n") for p in spool.glob("*.spool")) == 30

        # the edge restarts while Redis is still down: the spool survives, and grows
        procs.running[0].terminate()
        assert procs.running[0].wait(20) == 0
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT="1000")
        assert await clicks(edge, 10) == [200] * 10
        assert sum(p.read_bytes().count(b"\n") for p in spool.glob("*.spool")) == 40

        private_redis.start()  # empty: the spool is replayed into fresh streams
        await wait_for(lambda: counted(60), timeout=60, what="the spool to drain and the worker to count it")

        async def spool_empty() -> bool:
            return not list(spool.glob("*.spool"))

        await wait_for(spool_empty, timeout=30, what="the spool files to go")
        await procs.cli("work", "--drain")
        assert await counted(60)  # every click once: none lost, none twice
        assert await pg.fetchval("SELECT count(*) FROM events") == 60
    finally:
        procs.stop_all()
