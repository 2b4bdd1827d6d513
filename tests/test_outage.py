"""A worker whose Redis goes away waits and reconnects: it never exits and never spins."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD

from ._procs import Procs
from ._redis import PrivateRedis
from .conftest import wait_for


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def test_worker_rides_out_a_redis_outage(
    settings: Settings, private_redis: PrivateRedis, pg: asyncpg.Pool, tmp_path: Path
):
    import redis.asyncio as aioredis

    own = settings.model_copy(update={"redis_url": private_redis.url})
    procs = Procs(own, tmp_path)
    keys = Keys(own.stream_prefix, own.partitions)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
        worker = procs.start("work")

        async def click(n: int) -> None:
            client = aioredis.Redis.from_url(private_redis.url)
            try:
                async with asyncio.timeout(30):
                    while True:  # the restarted Redis may need a moment before it answers
                        try:
                            await client.ping()
                            break
                        except (OSError, ConnectionError, aioredis.ConnectionError):
                            await asyncio.sleep(0.05)
                for _ in range(n):
                    e = Envelope(
                        type=EventType.CLICK,
                        dialect=Dialect.BIORE,
                        payload={"code": "alice"},
                        user_agent="Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
                    )
                    await client.xadd(keys.stream_for("alice"), {FIELD: wire.to_blob(e)})
            finally:
                await client.aclose()

        async def counted(n: int) -> bool:
            clicks: int = await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'")
            return clicks == n

        await click(5)
        await wait_for(lambda: counted(5), timeout=60, what="the first clicks")

        private_redis.kill()

        async def noticed() -> bool:
            return "unavailable" in procs.logs()

        await wait_for(noticed, timeout=30, what="the worker to notice the outage")
        before = cpu_seconds(worker.pid)
        await asyncio.sleep(3)  # an outage of a few seconds, on purpose: nothing to await in it
        assert worker.poll() is None, procs.logs()  # still there
        assert cpu_seconds(worker.pid) - before < 1.0  # and not spinning

        private_redis.start()  # empty: no stream, no group, no cache; the worker recreates what it needs
        await click(5)
        await wait_for(lambda: counted(10), timeout=60, what="clicks after the outage")
        assert worker.poll() is None
    finally:
        procs.stop_all()
    assert worker.returncode == 0  # SIGTERM: a clean stop
