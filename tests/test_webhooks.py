"""Webhook delivery against real Postgres, Redis, arq workers and HTTP receivers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import orjson
import pytest
from aiohttp import web
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from ingest.contract.settings import Settings
from ingest.host import server
from ingest.ledger import outbox, secretbox
from ingest.ledger.outbox import WebhookEvent
from ingest.manage.routes import webhooks as webhook_routes
from workers.consumer import webhooks

from ._procs import free_port
from ._world import call, make_world

# arq 0.28 closes its pool with redis-py's deprecated close()
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")


def with_key(settings: Settings, key: str | None) -> Settings:
    # the receivers here listen on 127.0.0.1: allowed as an on-premises operator would allow it
    # (tests/test_hostile.py checks that without the setting such targets are refused)
    return settings.model_copy(update={"secret_key": key, "webhook_allow_private": True})


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1 that answers the scripted statuses (the last repeats)."""

    statuses: list[int]
    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses[min(len(self.requests), len(self.statuses)) - 1]
        return web.Response(status=status, text="ok" if status < 300 else "nope")


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[list[int]], Any]]:
    runners: list[web.AppRunner] = []

    async def start(statuses: list[int]) -> Receiver:
        r = Receiver(statuses)
        app = web.Application()
        app.router.add_post("/hook", r.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        r.url = f"http://127.0.0.1:{port}/hook"
        return r

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def secret_key() -> str:
    return secretbox.generate_key()


@pytest.fixture
def queue(settings: Settings) -> str:
    # under the test's key prefix, so the redis fixture deletes the queue and health key
    return f"{settings.stream_prefix}:arq"


@pytest.fixture
async def arq_pool(settings: Settings, queue: str, pg: asyncpg.Pool, redis: Any) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        default_queue_name=queue,
    )
    try:
        yield pool
    finally:
        # arq keeps job, retry and result keys under its own global prefixes, named by job id
        ids = {str(r["id"]) for r in await pg.fetch("SELECT id FROM webhook_deliveries")}
        async for key in pool.scan_iter(match="arq:*webhook:*", count=1000):
            if key.decode().rpartition("webhook:")[2] in ids:
                await pool.delete(key)
        await pool.aclose()


@pytest.fixture
def run_worker(settings: Settings, queue: str, pg: asyncpg.Pool, secret_key: str) -> Callable[..., Any]:
    async def run(**ctx: Any) -> Worker:
        worker = Worker(
            functions=[webhooks.deliver_webhook_job],
            redis_settings=RedisSettings.from_dsn(settings.redis_url),
            queue_name=queue,
            burst=True,
            job_serializer=orjson.dumps,
            job_deserializer=orjson.loads,
            ctx={"pg": pg, "settings": with_key(settings, secret_key), "webhook_backoff_s": 0.05, **ctx},
            on_startup=webhooks.webhook_startup,
            on_shutdown=webhooks.webhook_shutdown,
            poll_delay=0.05,
            handle_signals=False,
            keep_result=0,
        )
        try:
            await worker.async_run()
        finally:
            await worker.close()
        return worker

    return run


async def make_webhook(
    pg: asyncpg.Pool, workspace_id: str, url: str, key: str, *, events: list[str] | None = None, active: bool = True
) -> tuple[str, str]:
    """A webhook as the route makes one; its id and its secret."""
    secret = secretbox.new_secret()
    wid = await pg.fetchval(
        "INSERT INTO webhooks (workspace_id, url, events, secret_encrypted, secret_prefix, active)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        workspace_id,
        url,
        events or list(outbox.EVENT_TYPES),
        secretbox.encrypt(key, secret),
        secretbox.display_prefix(secret),
        active,
    )
    return str(wid), secret


def lead(workspace_id: str, **payload: Any) -> WebhookEvent:
    eid = uuid.uuid4()
    return WebhookEvent(workspace_id, "lead.created", eid, "", {"event_id": str(eid), **payload})


async def record(pg: asyncpg.Pool, events: list[WebhookEvent]) -> list[str]:
    async with pg.acquire() as conn, conn.transaction():
        return await outbox.record_deliveries(conn, events)


async def attempts(pg: asyncpg.Pool, delivery_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pg.fetch(
        "SELECT attempt, status_code, error, duration_ms FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt",
        uuid.UUID(delivery_id),
    )
    return rows


async def test_retries_until_delivered_and_signs(pg, world, receiver, arq_pool, run_worker, secret_key) -> None:
    hook = await receiver([500, 500, 200])
    _, secret = await make_webhook(pg, world.workspace_id, hook.url, secret_key)
    (delivery,) = await record(pg, [lead(world.workspace_id, email="a@example.com")])
    assert await webhooks.enqueue(arq_pool, [delivery]) == 1
    assert await webhooks.enqueue(arq_pool, [delivery]) == 0  # arq dedupes by job id

    worker = await run_worker()

    assert worker.jobs_retried == 2 and worker.jobs_complete == 1 and worker.jobs_failed == 0
    row = await pg.fetchrow(
        "SELECT status, attempts, delivered_at FROM webhook_deliveries WHERE id = $1", uuid.UUID(delivery)
    )
    assert (row["status"], row["attempts"]) == ("delivered", 3) and row["delivered_at"] is not None
    rows = await attempts(pg, delivery)
    assert [(r["attempt"], r["status_code"], r["error"]) for r in rows] == [
        (1, 500, None),
        (2, 500, None),
        (3, 200, None),
    ]
    assert all(r["duration_ms"] >= 0 for r in rows)
    assert len(hook.requests) == 3
    for headers, body in hook.requests:
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Refstream-Event"] == "lead.created"
        assert headers["X-Refstream-Delivery"] == delivery
        assert webhooks.verify_signature(secret, headers["X-Refstream-Signature"], body)
        assert not webhooks.verify_signature(secret, headers["X-Refstream-Signature"], body + b" ")
        assert not webhooks.verify_signature("whsec_other", headers["X-Refstream-Signature"], body)
        sent = orjson.loads(body)
        assert (sent["id"], sent["type"], sent["data"]["email"]) == (delivery, "lead.created", "a@example.com")
        assert sent["created_at"]


def test_verify_signature_refuses_stale_and_malformed() -> None:
    header = webhooks.sign("whsec_x", b"{}", 1_000_000)
    assert webhooks.verify_signature("whsec_x", header, b"{}", now=1_000_100)
    assert not webhooks.verify_signature("whsec_x", header, b"{}", now=1_000_400)
    assert not webhooks.verify_signature("whsec_x", header, b"{}", tolerance_s=10, now=1_000_100)
    for bad in ("", "t=abc,v1=00", "v1=" + header.rpartition("v1=")[2], "t=1000000"):
        assert not webhooks.verify_signature("whsec_x", bad, b"{}", now=1_000_000)
    assert [webhooks.backoff(n) for n in (1, 2, 3, 9, 20)] == [10, 20, 40, 2560, 3600]


async def test_record_deliveries_is_idempotent_and_scoped(pg, redis, keys, world) -> None:
    other = await make_world(pg, redis, keys, code="OTHER1", name="Other")
    key = secretbox.generate_key()
    leads_only, _ = await make_webhook(pg, world.workspace_id, "https://a.example/h", key, events=["lead.created"])
    everything, _ = await make_webhook(pg, world.workspace_id, "https://b.example/h", key)
    await make_webhook(pg, world.workspace_id, "https://c.example/h", key, active=False)
    await make_webhook(pg, other.workspace_id, "https://d.example/h", key)
    ev = lead(world.workspace_id)
    conv = WebhookEvent(world.workspace_id, "conversion.created", uuid.uuid4(), "", {"amount": 10})
    milestone = uuid.uuid4()
    m1 = WebhookEvent(world.workspace_id, "milestone.reached", milestone, world.affiliate_id, {"n": 5})
    m2 = WebhookEvent(world.workspace_id, "milestone.reached", milestone, str(uuid.uuid4()), {"n": 5})

    first = await record(pg, [m2, conv, ev, m1, ev])  # a duplicate in the batch too
    assert len(first) == 5 and first == sorted(first)
    assert await record(pg, [ev, conv, m1, m2]) == []
    assert await record(pg, []) == []
    rows = await pg.fetch("SELECT webhook_id, event_type, subject_key, payload, status FROM webhook_deliveries")
    got = sorted((str(r["webhook_id"]), r["event_type"], r["subject_key"]) for r in rows)
    assert got == sorted(
        [
            (leads_only, "lead.created", ""),
            (everything, "lead.created", ""),
            (everything, "conversion.created", ""),
            (everything, "milestone.reached", world.affiliate_id),
            (everything, "milestone.reached", m2.subject_key),
        ]
    )
    assert {r["status"] for r in rows} == {"pending"}
    assert any(r["payload"] == {"amount": 10} for r in rows)


async def test_gives_up_after_max_attempts(pg, world, receiver, arq_pool, run_worker, secret_key) -> None:
    hook = await receiver([503])
    await make_webhook(pg, world.workspace_id, hook.url, secret_key)
    await make_webhook(pg, world.workspace_id, f"http://127.0.0.1:{free_port()}/nobody", secret_key)
    ids = await record(pg, [lead(world.workspace_id)])
    assert len(ids) == 2
    await webhooks.enqueue(arq_pool, ids)

    worker = await run_worker(webhook_max_attempts=3)

    assert worker.jobs_failed == 0 and worker.jobs_complete == 2 and worker.jobs_retried == 4
    assert len(hook.requests) == 3
    rows = await pg.fetch(
        "SELECT d.id, status, attempts, delivered_at, w.url FROM webhook_deliveries d"
        " JOIN webhooks w ON w.id = webhook_id"
    )
    for row in rows:
        assert (row["status"], row["attempts"], row["delivered_at"]) == ("failed", 3, None)
        tries = await attempts(pg, str(row["id"]))
        assert [t["attempt"] for t in tries] == [1, 2, 3]
        if row["url"] == hook.url:
            assert [(t["status_code"], t["error"]) for t in tries] == [(503, None)] * 3
        else:  # nothing listens there: no status, the connection error instead
            assert all(t["status_code"] is None and "Connect" in t["error"] for t in tries)


async def test_sweep_requeues_lost_pending_deliveries(
    pg, world, receiver, arq_pool, run_worker, queue, secret_key
) -> None:
    key = secret_key
    hook = await receiver([200])
    await make_webhook(pg, world.workspace_id, hook.url, key)
    lost, fresh, done = [await record(pg, [lead(world.workspace_id)]) for _ in range(3)]
    await pg.execute(
        "UPDATE webhook_deliveries SET created_at = now() - interval '2 minutes' WHERE id = ANY($1::uuid[])",
        [lost[0], done[0]],
    )
    await pg.execute("UPDATE webhook_deliveries SET status = 'delivered' WHERE id = $1", uuid.UUID(done[0]))
    ctx = {"pg": pg, "redis": arq_pool}

    assert await webhooks.sweep_webhooks(ctx) == 1
    assert await webhooks.sweep_webhooks(ctx) == 0  # its job is still queued
    assert [j.decode() for j in await arq_pool.zrange(queue, 0, -1)] == [f"webhook:{lost[0]}"]

    await run_worker()
    status = dict(await pg.fetch("SELECT id::text, status FROM webhook_deliveries"))
    assert status == {lost[0]: "delivered", fresh[0]: "pending", done[0]: "delivered"}
    assert len(hook.requests) == 1


async def test_enqueue_refuses_pickle(settings: Settings) -> None:
    pool = ArqRedis.from_url(settings.redis_url)
    try:
        with pytest.raises(RuntimeError, match="never pickle"):
            await webhooks.enqueue(pool, [str(uuid.uuid4())])
    finally:
        await pool.aclose()


async def test_secret_is_stored_encrypted(pg, world, secret_key) -> None:
    wid, secret = await make_webhook(pg, world.workspace_id, "https://x.example/h", secret_key)
    row = await pg.fetchrow(
        "SELECT secret_encrypted, secret_prefix, w::text AS everything FROM webhooks w WHERE id = $1", uuid.UUID(wid)
    )
    assert secret.startswith("whsec_") and len(secret) > 40
    assert secret.encode() not in row["secret_encrypted"] and secret not in row["everything"]
    assert secret[10:] not in row["everything"] and row["secret_prefix"] == secret[:10]
    assert secretbox.decrypt(secret_key, row["secret_encrypted"]) == secret
    rotated = f"{secretbox.generate_key()},{secret_key}"  # a new key first, the old still opens
    assert secretbox.decrypt(rotated, row["secret_encrypted"]) == secret
    for bad in (None, "", "not-a-key", secretbox.generate_key()):
        with pytest.raises(secretbox.SecretKeyError) as exc:
            secretbox.decrypt(bad, row["secret_encrypted"])
        assert secret not in str(exc.value)


# the management routes --------------------------------------------------------------------


@pytest.fixture
async def edge_with(settings: Settings, redis: Any, pg: asyncpg.Pool) -> AsyncIterator[Callable[..., Any]]:
    """An edge on a real port, with or without a secret key, the webhook routes registered."""
    runners: list[web.AppRunner] = []

    async def start(key: str | None) -> str:
        served = await server.start(with_key(settings, key), "127.0.0.1", free_port())
        runners.append(served.runner)
        return served.url

    yield start
    for runner in runners:
        await runner.cleanup()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_routes_without_a_key_are_unconfigured(edge_with, world) -> None:
    base = await edge_with(None)
    status, body, _ = await call(
        "POST", f"{base}/v1/webhooks", json={"url": "https://x.example/h"}, headers=bearer(world.api_key)
    )
    assert (status, body) == (503, {"error": "webhooks_unconfigured", "detail": "set REFSTREAM_SECRET_KEY"})
    status, body, _ = await call("POST", f"{base}/v1/webhooks", json={"url": "https://x.example/h"})
    assert (status, body) == (401, {"error": "unauthorized"})


async def test_routes_create_and_list(
    pg, redis, keys, world, edge_with, receiver, arq_pool, run_worker, secret_key
) -> None:
    base = await edge_with(secret_key)
    hook = await receiver([500, 204])
    url = f"{base}/v1/webhooks"
    for bad in (
        {"url": "ftp://x"},
        {"url": "https://"},
        {"url": "https://x.example", "events": ["click.created"]},
        {"url": "https://x.example", "events": []},
        {"url": "https://x.example", "secret": "mine"},
    ):
        status, body, _ = await call("POST", url, json=bad, headers=bearer(world.api_key))
        assert (status, body["error"]) == (400, "invalid_request"), bad
    status, created, _ = await call("POST", url, json={"url": hook.url}, headers=bearer(world.api_key))
    assert status == 201 and created["url"] == hook.url and created["secret"].startswith("whsec_")
    assert created["events"] == list(webhook_routes.EVENT_TYPES) == list(outbox.EVENT_TYPES)
    webhook_routes.Webhook.model_validate(created)
    stored = await pg.fetchval("SELECT secret_encrypted FROM webhooks WHERE id = $1", uuid.UUID(created["id"]))
    assert secretbox.decrypt(secret_key, stored) == created["secret"]

    ids = await record(pg, [lead(world.workspace_id, email="b@example.com")])
    await webhooks.enqueue(arq_pool, ids)
    await run_worker()
    headers, body = hook.requests[-1]
    assert webhooks.verify_signature(created["secret"], headers["X-Refstream-Signature"], body)

    status, listed, _ = await call("GET", f"{url}/{created['id']}/deliveries?limit=10", headers=bearer(world.api_key))
    assert status == 200
    webhook_routes.DeliveryList.model_validate(listed)
    (delivery,) = listed["data"]
    assert (delivery["id"], delivery["status"], delivery["payload"]["email"]) == (ids[0], "delivered", "b@example.com")
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 204)]

    other = await make_world(pg, redis, keys, code="OTHER2", name="Other")
    for hdrs, want in ((bearer(other.api_key), 404), ({}, 401)):
        status, _, _ = await call("GET", f"{url}/{created['id']}/deliveries", headers=hdrs)
        assert status == want
    status, _, _ = await call("GET", f"{url}/not-a-uuid/deliveries", headers=bearer(world.api_key))
    assert status == 404
    status, _, _ = await call("GET", f"{url}/{created['id']}/deliveries?limit=0", headers=bearer(world.api_key))
    assert status == 400


async def test_enqueue_writes_the_jobs_arq_would_and_refuses_live_ids(arq_pool, queue, monkeypatch) -> None:
    """The batched enqueue (one script call per chunk) writes what arq's enqueue_job writes:
    the same job record, expiry and queue score; and refuses an id whose job is queued or
    whose result is kept, as enqueue_job does."""
    from arq.constants import job_key_prefix, result_key_prefix
    from arq.jobs import deserialize_job

    monkeypatch.setattr(webhooks, "ENQUEUE_CHUNK", 2)  # chunk boundaries inside one call
    theirs, finished, *ours = [str(uuid.uuid4()) for _ in range(7)]
    keys = [f"{p}webhook:{i}" for i in (theirs, finished, *ours) for p in (job_key_prefix, result_key_prefix)]
    try:
        assert await arq_pool.enqueue_job(webhooks.JOB, theirs, _job_id=f"webhook:{theirs}") is not None
        await arq_pool.set(f"{result_key_prefix}webhook:{finished}", b"kept", px=60_000)

        assert await webhooks.enqueue(arq_pool, [*ours, theirs, finished]) == len(ours)
        assert await webhooks.enqueue(arq_pool, ours) == 0  # all queued now

        queued = {m.decode(): s for m, s in await arq_pool.zrange(queue, 0, -1, withscores=True)}
        assert sorted(queued) == sorted(f"webhook:{i}" for i in (theirs, *ours))
        reference = deserialize_job(await arq_pool.get(f"{job_key_prefix}webhook:{theirs}"), deserializer=orjson.loads)
        # orjson decodes a job's args as a list, where arq's types say tuple
        assert cast(list[Any], reference.args) == [theirs]
        reference_ttl = await arq_pool.pttl(f"{job_key_prefix}webhook:{theirs}")
        for i in ours:
            job = deserialize_job(await arq_pool.get(f"{job_key_prefix}webhook:{i}"), deserializer=orjson.loads)
            assert (job.function, cast(list[Any], job.args), job.kwargs, job.job_try) == (
                reference.function,
                [*reference.args[:-1], i],
                reference.kwargs,
                reference.job_try,
            )
            assert abs((job.enqueue_time - reference.enqueue_time).total_seconds()) < 60
            # scored to run now, as enqueue_job scores a job that is not deferred
            assert queued[f"webhook:{i}"] == pytest.approx(job.enqueue_time.timestamp() * 1000, abs=1)
            ttl = await arq_pool.pttl(f"{job_key_prefix}webhook:{i}")
            assert abs(ttl - reference_ttl) < 60_000 and ttl > arq_pool.expires_extra_ms - 60_000
    finally:
        await arq_pool.delete(*keys)
        await arq_pool.zrem(queue, *[f"webhook:{i}" for i in (theirs, finished, *ours)])


@pytest.fixture
async def paths_seen() -> AsyncIterator[tuple[str, list[str]]]:
    """A webhook receiver on 127.0.0.1 that records each request's target as sent."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_webhook_is_sent_to_its_target_as_given(
    pg: asyncpg.Pool,
    world: Any,
    paths_seen: tuple[str, list[str]],
    arq_pool: ArqRedis,
    run_worker: Any,
    secret_key: str,
) -> None:
    """yarl read ``%7E`` as ``~`` and a query's ``%2F`` as ``/``: a receiver that checks a
    signature over its query saw another one."""
    base, seen = paths_seen
    target = "/hooks/a%7Eb/c%2Fd?sig=ab%2Fcd%3D%3D&x=%20+y&flag"
    await make_webhook(pg, world.workspace_id, base + target, secret_key)
    (delivery,) = await record(pg, [lead(world.workspace_id)])
    assert await webhooks.enqueue(arq_pool, [delivery]) == 1
    await run_worker()
    assert seen == [target]
