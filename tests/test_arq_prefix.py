"""Every Redis key refstream writes carries REFSTREAM_STREAM_PREFIX, arq's own included
(job, in-progress, result, retry and abort keys: ``workers.host.arq_redis``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from arq.jobs import JobStatus

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from refstream.embedded import free_port
from workers.consumer import webhooks
from workers.host.arq_redis import UnprefixedKey, connect_arq, prefixed

from ._procs import Procs
from ._redis import PrivateRedis
from ._world import make_world
from .conftest import SECRET_KEY, wait_for
from .test_webhooks import make_webhook


def test_arqs_keys_go_under_the_prefix_and_an_unknown_command_refuses() -> None:
    assert prefixed("P", ("PSETEX", "arq:job:x", 10, b"{}")) == ("PSETEX", "P:arq:job:x", 10, b"{}")
    assert prefixed("P", ("EXISTS", "arq:job:x", b"arq:result:x")) == ("EXISTS", "P:arq:job:x", b"P:arq:result:x")
    # the queue and the health-check key are named by refstream already; values are left alone
    assert prefixed("P", ("ZADD", "P:arq:queue", 5, "arq:odd-job-id")) == ("ZADD", "P:arq:queue", 5, "arq:odd-job-id")
    with pytest.raises(UnprefixedKey):
        prefixed("P", ("LPUSH", "arq:new-list", "x"))


async def test_a_worker_and_its_enqueuers_write_no_key_outside_the_prefix(
    private_redis: PrivateRedis, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"redis_url": private_redis.url})
    keys = Keys(s.stream_prefix, s.partitions)
    redis = aioredis.Redis.from_url(private_redis.url)
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    procs = Procs(s, tmp_path)
    arq = await connect_arq(s)
    try:
        world = await make_world(pg, redis, keys)
        await make_webhook(pg, world.workspace_id, f"http://127.0.0.1:{port}/hook", SECRET_KEY, events=["lead.created"])
        procs.start("work", REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true")  # its receiver is on loopback
        lead = {"code": "PARTNER123", "visitor_id": "v1", "external_id": "c1", "name": "Sign Up"}
        entry = await redis.xadd(
            keys.stream_for("PARTNER123"), {FIELD: wire.to_blob(Envelope(EventType.LEAD, Dialect.REFPORT, lead))}
        )

        # the webhook job: enqueued by the worker after its batch's COMMIT, run by its arq
        await wait_for(lambda: _true(received), timeout=60, what="the webhook delivery")

        async def delivered() -> Any:
            return await pg.fetchval("SELECT status = 'delivered' FROM webhook_deliveries")

        await wait_for(delivered, what="the delivery recorded")
        # the crons (run at startup): the link cache refresh marks it warm
        await wait_for(lambda: redis.exists(keys.links_warm), timeout=60, what="refresh_links")
        # a job enqueued from outside the worker: the replay job, through the same pool
        job = await arq.enqueue_job("replay", from_id=entry.decode(), to_id=entry.decode())
        assert job is not None

        async def replayed() -> bool:
            return await job.status() == JobStatus.not_found  # done: keep_result=0 leaves nothing

        await wait_for(replayed, timeout=60, what="the replay job")
        assert await webhooks.enqueue(arq, []) == 0

        found = sorted([k.decode() async for k in redis.scan_iter(count=1000)])
        outside = [k for k in found if not k.startswith(f"{s.stream_prefix}:")]
        assert outside == [], outside
        # and arq did write: its health check, the cron jobs kept in progress for a minute
        arq_keys = [k.removeprefix(f"{s.stream_prefix}:") for k in found if ":arq:" in k]
        assert "arq:queue:health-check" in arq_keys, arq_keys
        assert any(k.startswith("arq:in-progress:cron:refresh_links:") for k in arq_keys), arq_keys
        # all_job_results lists by KEYS and cuts arq's prefix off: ours is cut off first
        assert await arq.keys("arq:in-progress:cron:refresh_links:*")
        assert all(k.startswith(b"arq:") for k in await arq.keys("arq:*"))
    finally:
        procs.stop_all()
        await arq.aclose()
        await redis.aclose()
        await runner.cleanup()


async def _true(items: list[bytes]) -> bool:
    return bool(items)
