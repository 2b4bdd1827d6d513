"""Webhook delivery: an outbox in Postgres, arq jobs with retries, Stripe-style signatures.

1. ``record_deliveries`` (``ingest.ledger.outbox``) runs inside the worker's batch
   transaction (or a management write's) and writes one
   ``webhook_deliveries`` row per (subscribed, active webhook, event): the outbox commits or
   rolls back with the events themselves, and its unique key makes a redelivered or
   replayed event a no-op.
2. After COMMIT, ``enqueue`` puts one ``deliver_webhook`` job per new row on arq's queue
   (the batch's jobs in one round trip), job id ``webhook:{delivery id}``: a second job
   with a live id is refused, as arq refuses it, so the
   ``sweep_webhooks`` cron can re-enqueue every old pending row (a crash between COMMIT
   and enqueue) without doubling a delivery.
3. ``deliver_webhook`` POSTs, records the attempt, and retries with exponential backoff
   (10 s, 20 s, 40 s ... capped at 1 h) until a 2xx or ``MAX_ATTEMPTS``.

The request (what a receiver sees)::

    POST <url>
    Content-Type: application/json
    X-Refstream-Event: lead.created
    X-Refstream-Delivery: <delivery id>           (the same on every retry: dedupe on it)
    X-Refstream-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

    {"id": "<delivery id>", "type": "lead.created", "created_at": "<ISO 8601>", "data": {...}}

Receivers recompute the HMAC over the raw body with their ``whsec_...`` secret, compare
in constant time and refuse timestamps older than a few minutes (``verify_signature``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import structlog
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from arq.worker import Function, func
from yarl import URL

from ingest.contract import clock
from ingest.ledger import secretbox, targets

log = structlog.get_logger("workers.webhooks")

JOB = "deliver_webhook"
MAX_ATTEMPTS = 8
BACKOFF_S = 10.0  # first retry; doubles each time (ctx["webhook_backoff_s"] overrides)
BACKOFF_CAP_S = 3600.0
TIMEOUT_S = 10.0
SWEEP_AFTER_S = 60  # pending this long and no live job: the enqueue after COMMIT was lost
SWEEP_LIMIT = 1000
USER_AGENT = "refstream-webhooks/1"


# arq's enqueue_job, for many jobs in one round trip: each job whose job key and result key
# are both absent (not queued, deferred for a retry, running, or finished with its result
# kept) is written and queued, exactly as enqueue_job writes it, atomically. enqueue_job
# costs three round trips a job (WATCH, EXISTS, MULTI…EXEC): a batch of 500 flagged clicks
# made 1,500, one after another, in its partition's turn.
# KEYS: the queue, then each job's job key and result key; ARGV: score, expiry (ms), then
# each job's id and serialized job.
_ENQUEUE = """
local new = 0
for i = 1, (#KEYS - 1) / 2 do
    if redis.call('EXISTS', KEYS[2 * i], KEYS[2 * i + 1]) == 0 then
        redis.call('PSETEX', KEYS[2 * i], ARGV[2], ARGV[2 * i + 2])
        redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2 * i + 1])
        new = new + 1
    end
end
return new
"""
ENQUEUE_CHUNK = 500  # jobs per script call: Redis runs nothing else while a script runs


async def enqueue(arq: ArqRedis, delivery_ids: list[str], *, queue_name: str | None = None) -> int:
    """One ``deliver_webhook`` job per delivery, job id ``webhook:{delivery id}``; returns
    how many were new (an id whose job is still queued, deferred for a retry, or running is
    skipped, as arq's ``enqueue_job`` skips it). One round trip per ``ENQUEUE_CHUNK`` jobs."""
    if arq.job_serializer is None:
        raise RuntimeError("the arq pool must be created with job_serializer=orjson.dumps: jobs are JSON, never pickle")
    queue = queue_name or arq.default_queue_name
    script = arq.register_script(_ENQUEUE)
    ids = sorted(delivery_ids)
    new = 0
    for at in range(0, len(ids), ENQUEUE_CHUNK):
        now = timestamp_ms()  # the score (run now) and the job's enqueue time, as arq's
        keys: list[str] = [queue]
        args: list[str | bytes | int] = [now, arq.expires_extra_ms]
        for delivery_id in ids[at : at + ENQUEUE_CHUNK]:
            job_id = f"webhook:{delivery_id}"
            keys += [job_key_prefix + job_id, result_key_prefix + job_id]
            args += [job_id, serialize_job(JOB, (delivery_id,), {}, None, now, serializer=arq.job_serializer)]
        new += int(await script(keys=keys, args=args))
    return new


def backoff(attempt: int, base: float = BACKOFF_S) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return float(min(base * 2 ** (attempt - 1), BACKOFF_CAP_S))


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Refstream-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: int = 300, *, now: float | None = None
) -> bool:
    """For receivers: does ``header`` sign ``body`` (the raw bytes) with ``secret``, recently?"""
    timestamp, macs = None, []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        if k == "t" and v.isascii() and v.isdigit():
            timestamp = int(v)
        elif k == "v1":
            macs.append(v)
    if timestamp is None or abs((clock.now() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected.encode(), m.encode()) for m in macs)


_LOAD = """
SELECT d.id, d.webhook_id, d.event_type, d.payload, d.status, d.created_at, w.url, w.secret_encrypted, w.active,
       w.workspace_id
  FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
 WHERE d.id = $1
"""
# the attempt and the delivery's new state in one statement; "WHERE pending" never undoes
# a delivery another run finished
_RECORD = """
WITH d AS (
    UPDATE webhook_deliveries
       SET attempts = attempts + 1,
           status = CASE WHEN $2 THEN 'delivered' WHEN attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,
           delivered_at = CASE WHEN $2 THEN now() END
     WHERE id = $1 AND status = 'pending'
 RETURNING id, attempts
)
INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_ms)
SELECT id, attempts, $4, $5, $6 FROM d
RETURNING attempt
"""


async def _pools(ctx: dict[str, Any]) -> list[asyncpg.Pool]:
    """Every shard's pool (``ctx["placement"]``), else the one pool ``ctx["pg"]``."""
    place = ctx.get("placement")
    return list((await place.pools()).values()) if place is not None else [ctx["pg"]]


async def _load(ctx: dict[str, Any], delivery_id: UUID) -> tuple[asyncpg.Pool, Any] | None:
    """The delivery and the pool of the shard that holds it: its id is unique across shards."""
    place = ctx.get("placement")
    if place is None:
        row = await ctx["pg"].fetchrow(_LOAD, delivery_id)
        return (ctx["pg"], row) if row is not None else None
    found = await place.find(lambda pool: pool.fetchrow(_LOAD, delivery_id), lambda r: r["workspace_id"])
    if found is None:
        return None
    return await place.pool_of(found[0]), found[1]


async def deliver_webhook(ctx: dict[str, Any], delivery_id: str) -> str:
    """The arq job: one attempt at one delivery; ``arq.Retry`` schedules the next."""
    max_attempts: int = ctx.get("webhook_max_attempts", MAX_ATTEMPTS)
    found = await _load(ctx, UUID(delivery_id))
    if found is None:
        return "gone"  # its webhook was deleted
    pg, row = found
    if row["status"] != "pending":
        return str(row["status"])
    if not row["active"]:
        await pg.execute(
            "UPDATE webhook_deliveries SET status = 'failed' WHERE id = $1 AND status = 'pending'", row["id"]
        )
        return "inactive"
    # a missing key raises: the row stays pending and the sweep brings it back once it is set
    secret = secretbox.decrypt(getattr(ctx["settings"], "secret_key", None), row["secret_encrypted"])
    body = orjson.dumps(
        {
            "id": delivery_id,
            "type": row["event_type"],
            "created_at": row["created_at"].isoformat(),
            "data": row["payload"],
        }
    )
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Refstream-Event": row["event_type"],
        "X-Refstream-Delivery": delivery_id,
        "X-Refstream-Signature": sign(secret, body, int(clock.now())),
    }
    http: aiohttp.ClientSession = ctx["http"]
    status_code: int | None = None
    error: str | None
    started = time.perf_counter()
    # an address literal never reaches the resolver, so it is checked here; a name is
    # checked by the session's resolver on the addresses it has now (ingest.ledger.targets)
    refused = None if _allow_private(ctx) else targets.url_refusal(row["url"])
    if refused:
        error = f"refused: {refused}; webhooks are delivered to public addresses only"
        max_attempts = 0  # never retried: it cannot succeed until the URL or the setting changes
    else:
        status_code, error = await _post(http, row["url"], body, headers)
    duration_ms = round((time.perf_counter() - started) * 1000)
    ok = status_code is not None and 200 <= status_code < 300
    attempt = await pg.fetchval(_RECORD, row["id"], ok, max_attempts, status_code, error, duration_ms)
    if attempt is None:
        return "raced"  # another run finished this delivery meanwhile
    fields = {"delivery_id": delivery_id, "webhook_id": str(row["webhook_id"]), "attempt": attempt}
    if ok:
        log.info("webhook.delivered", **fields, status_code=status_code, duration_ms=duration_ms)
        return "delivered"
    if attempt >= max_attempts:
        log.warning("webhook.failed", **fields, status_code=status_code, error=error)
        return "failed"
    defer = backoff(attempt, ctx.get("webhook_backoff_s", BACKOFF_S))
    log.info("webhook.retry", **fields, status_code=status_code, error=error, retry_in_s=defer)
    raise Retry(defer=defer)


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int | None, str | None]:
    """One POST: the receiver's status, or why none came."""
    try:
        # redirects are not followed: a receiver that moved answers 3xx, which is a failure
        # (and a redirect could point anywhere, our own network included)
        async with http.post(
            _as_given(url),
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        ) as resp:
            return resp.status, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:500]


def _as_given(url: str) -> URL | str:
    """The target as its owner gave it: yarl would read ``%7E`` as ``~`` and a query's
    ``%2F`` as ``/``, so a receiver checking a signature over its query saw another one. A
    target that is not ASCII (a name in IDNA) is yarl's to encode."""
    return URL(url, encoded=True) if url.isascii() else url


def _allow_private(ctx: dict[str, Any]) -> bool:
    return bool(getattr(ctx.get("settings"), "webhook_allow_private", False))


# arq's own try limit sits above ours: a worker restart mid-attempt spends an arq try but
# records no attempt, and the sweep restarts any job arq gave up on
deliver_webhook_job: Function = func(deliver_webhook, name=JOB, max_tries=MAX_ATTEMPTS + 4, timeout=TIMEOUT_S + 20)


async def sweep_webhooks(ctx: dict[str, Any]) -> int:
    """arq cron: re-enqueue pending deliveries older than ``SWEEP_AFTER_S``; returns how many
    had no live job (each of them a lost enqueue, or a job arq gave up on)."""
    rows, failed = [], None
    for pool in await _pools(ctx):  # every shard's, past one that fails
        try:
            rows += await pool.fetch(_STALLED, SWEEP_AFTER_S, SWEEP_LIMIT)
        except Exception as exc:  # raised once the others' are enqueued
            failed = failed or exc
    new = await enqueue(ctx["redis"], [str(r["id"]) for r in rows])
    if new:
        log.warning("webhook.sweep", requeued=new, pending=len(rows))
    if failed is not None:
        raise failed
    return new


_STALLED = (
    "SELECT id FROM webhook_deliveries WHERE status = 'pending'"
    " AND created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2"
)


async def webhook_startup(ctx: dict[str, Any]) -> None:
    """Open the HTTP client the jobs share (``ctx["http"]``); call from the worker's startup.
    ``ctx["settings"].webhook_allow_private`` lets deliveries reach private addresses."""
    # the resolver refuses names that resolve to our own network (unless allowed), and the
    # connection goes to an address it checked: a name cannot change between check and use
    resolver = None if _allow_private(ctx) else targets.PublicResolver()
    ctx["http"] = aiohttp.ClientSession(
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=10, resolver=resolver),
        trust_env=False,  # no proxy from the environment: it would resolve names we never checked
    )


async def webhook_shutdown(ctx: dict[str, Any]) -> None:
    """Close ``ctx["http"]``; call from the worker's shutdown."""
    http: aiohttp.ClientSession | None = ctx.pop("http", None)
    if http is not None:
        await asyncio.shield(http.close())
