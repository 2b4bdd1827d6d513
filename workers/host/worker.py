"""The arq worker process: startup opens Redis and Postgres and starts the XREADGROUP loop;
shutdown (SIGTERM, SIGINT) stops reading, lets the batch in flight commit and ack, closes.

arq hosts the process, runs the cron jobs that may wait (link cache refresh, webhook
sweep) and low-volume jobs with retries (webhook deliveries, replays). Its own queue is a
polled sorted set, so the event path is our consumer, not arq jobs, and the consumer's
housekeeping (reclaim, trim) runs on the consumer's own timers: one sweep can queue a
thousand webhook deliveries, and nothing the streams need may wait behind them. arq jobs
are serialized as JSON, never pickle.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
import structlog
from arq import Worker, cron
from arq.connections import create_pool

from ingest.contract import clock, heap, links
from ingest.contract.connections import connect_redis, create_pg_pool
from ingest.contract.keys import Keys
from ingest.contract.logs import error_fields
from ingest.contract.settings import Settings
from workers.archive.store import open_store
from workers.consumer import commissions, drops, webhooks
from workers.consumer.consume import Consumer
from workers.consumer.enrich import Enricher
from workers.consumer.metrics import WorkerMetrics, refresh_stream_gauges, serve
from workers.consumer.pipeline import Pipeline
from workers.group import stopping
from workers.group.errors import redis_outage
from workers.group.gate import Backoff
from workers.host import arq_redis
from workers.ops import erasure, replay

log = structlog.get_logger("workers.worker")

CLOSE_WITHIN_S = 5.0  # closing the pools, after the consumer stopped (or was given up)


def consumer_name(settings: Settings) -> str:
    return settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"


@asynccontextmanager
async def consumer(settings: Settings) -> AsyncIterator[Consumer]:
    """A consumer with its own connections, closed on exit even when cancelled."""
    # blocking reads hold a connection each: one per partition, plus acks and claims
    redis = connect_redis(settings, max_connections=settings.partitions * 2 + 4)
    try:
        # min_size=0: a worker starts while Postgres is down and its loop backs off until it is up
        pg = await create_pg_pool(settings, min_size=0)
    except BaseException:
        await redis.aclose()
        raise
    enricher = Enricher(city_db=settings.city_db)  # geo data and UA regexes: loaded once per process
    _settle_heap_once(settings.batch_size)
    # webhook signatures and dead letters' times follow Redis's clock when ours is off
    # (destructive steps never read this process's clock: see ingest/contract/clock.py)
    following = await clock.start_following(redis, settings.clock_skew_max_s, postgres=pg)
    pipeline = Pipeline(settings, redis, pg, enricher)
    try:
        yield Consumer(settings, redis, pipeline, name=consumer_name(settings))
    finally:
        following.cancel()
        enricher.close()
        await asyncio.shield(pipeline.replicated.aclose())
        await asyncio.shield(_close(redis, pg))


def settle_heap(batch_size: int) -> None:
    """The collector tuned for a batch pipeline (``ingest.contract.heap``; the worker: once
    per process): the youngest generation is collected after 20 new containers per event of
    a batch rather than after 700, since a batch keeps that many alive until it commits, so
    at 700 each batch paid several collections that found nothing but the batch itself
    (and promoted it, to be walked again)."""
    heap.settle(20 * batch_size)


_settle_heap_once = functools.cache(settle_heap)


async def _close(redis: Any, pg: Any) -> None:
    # asyncpg's close waits, without a bound, for every connection to come back: one still
    # held by a task that did not end (an arq job whose cancel was lost) would hold the exit
    try:
        async with asyncio.timeout(CLOSE_WITHIN_S):
            await pg.close()
    except TimeoutError:
        log.warning("postgres.close_timeout", within_s=CLOSE_WITHIN_S)
        pg.terminate()
    await redis.aclose()


async def drain(settings: Settings) -> dict[str, int]:
    """``refstream work --drain``: process until every partition is read and acked, exit."""
    async with consumer(settings) as c:
        # its batches' and burst pass's webhook jobs on the workers' queue, as a worker's own
        # are: without it they would wait for a running worker's sweep (a minute or two)
        c.pipeline.arq = await _arq_or_none(settings)
        try:
            await c.run(drain=True)
        finally:
            if c.pipeline.arq is not None:
                await c.pipeline.arq.aclose()
        totals = c.pipeline.totals
        return {k: getattr(totals, k) for k in totals.__slots__}


async def _arq_or_none(settings: Settings) -> Any:
    try:
        return await arq_redis.connect_arq(settings)
    except Exception as exc:  # the sweep cron enqueues what a drain could not
        log.warning("drain.arq_unavailable", error=type(exc).__name__)
        return None


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    cm = consumer(settings)
    c = await cm.__aenter__()
    ctx["consumer_cm"], ctx["consumer"] = cm, c
    c.pipeline.arq = ctx["redis"]  # arq's own pool: JSON serializer, our queue
    ctx["pg"] = c.pipeline.pg
    ctx["placement"] = c.pipeline.placement
    await webhooks.webhook_startup(ctx)
    ctx["metrics_stack"] = await _metrics(settings, c)
    task = asyncio.create_task(c.run(), name="consumer")

    def crashed(t: asyncio.Task[None]) -> None:
        # the loop only returns when stopped; anything else is a bug: exit for a restart
        if not t.cancelled() and (exc := t.exception()) is not None:
            # its kind and frames, not its message: an entry's value may be quoted there
            log.error("consumer.crashed", **error_fields(exc))
            os.kill(os.getpid(), signal.SIGTERM)

    task.add_done_callback(crashed)
    ctx["consumer_task"] = task


async def shutdown(ctx: dict[str, Any]) -> None:
    c: Consumer | None = ctx.pop("consumer", None)
    if c is None:
        return  # never started, or shut down already
    c.stop()  # the signal stopped it already (ResilientWorker.handle_sig): its bound runs from then
    try:
        # the consumer ends within its drain bound and a few seconds of goodbye; a second
        # bound here so that nothing it waits on can keep the process
        task = ctx["consumer_task"]
        done, _ = await asyncio.wait({task}, timeout=c.settings.drain_timeout_s + stopping.CANCEL_GRACE_S * 4)
        if not done:
            log.error("consumer.stop_overdue", task=stopping.waiting_at(task))
        elif not task.cancelled() and (died := task.exception()) is not None:
            raise died
    finally:
        await ctx["metrics_stack"].aclose()
        await webhooks.webhook_shutdown(ctx)
        await ctx["consumer_cm"].__aexit__(None, None, None)


async def _metrics(settings: Settings, c: Consumer) -> AsyncExitStack:
    """Metrics for this process, and their listener when ``REFSTREAM_METRICS_PORT`` is set."""
    metrics = c.pipeline.metrics = WorkerMetrics()
    enricher = c.pipeline.enricher
    if enricher is not None:
        metrics.watch_cache(lambda: (enricher.ua_cache_info().hits, enricher.ua_cache_info().misses))
    stack = AsyncExitStack()
    if settings.metrics_port is not None:

        async def before_scrape() -> None:
            await refresh_stream_gauges(metrics, c.redis, c.keys)

        port = await stack.enter_async_context(
            serve(metrics, settings.metrics_host, settings.metrics_port, before_scrape)
        )
        log.info("metrics.listening", host=settings.metrics_host, port=port)
    return stack


async def refresh_links(ctx: dict[str, Any]) -> int:
    """arq cron: write every link into the Redis cache and mark it warm, so the edge never
    asks Postgres about a code (and a Redis restart heals within one period)."""
    c: Consumer = ctx["consumer"]
    counted = await c.pipeline.placement.each(
        lambda pool: links.refresh_all(pool, c.redis, c.keys, warm=False), every=True
    )
    await links.mark_warm(c.redis, c.keys)  # every shard's links are in: the cache is whole
    return sum(counted.values())


async def fold_drops(ctx: dict[str, Any]) -> int:
    """arq cron: the edges' refusal tallies into ``drop_stats`` (``workers.consumer.drops``)."""
    c: Consumer = ctx["consumer"]
    return await drops.fold(c.redis, c.pipeline.placement, c.keys.prefix, c.pipeline.replicated)


async def approve_commissions(ctx: dict[str, Any]) -> int:
    """arq cron: commissions past their program's hold move pending -> approved, on
    Postgres's clock (``workers.consumer.commissions``). Idempotent: any worker may run it."""
    c: Consumer = ctx["consumer"]
    done = await c.pipeline.placement.each(lambda pool: pool.execute(commissions.APPROVE), every=True)
    return sum(int(d.rpartition(" ")[2] or 0) for d in done.values())


async def sweep_erasures(ctx: dict[str, Any]) -> int:
    """arq cron: pending erasures finished in Redis and the archive (``workers.ops.erasure``);
    nothing to do is one query."""
    c: Consumer = ctx["consumer"]
    settings = ctx["settings"]
    store = open_store(settings)
    done = await c.pipeline.placement.each_shard(  # each shard's ledger: its own erasures' entries
        lambda shard, pool: erasure.sweep(
            pool, c.redis, c.keys, store, replicas=settings.ack_replicas, wait_ms=settings.ack_wait_ms, shard=shard
        ),
        every=True,
    )
    return sum(len(d.archive_done) for d in done.values())


class ResilientWorker(Worker):
    """arq's worker, except that Redis going away, filling up (``noeviction``) or turning
    read-only is waited out with a backoff instead of ending the process: arq's own
    bookkeeping (health key, cron enqueues, job state) writes to Redis on every poll, and
    the consumer beside it must keep acking and trimming, which is what frees a full Redis."""

    def __init__(self, *args: Any, key_prefix: str | None = None, drain_timeout_s: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_prefix = key_prefix
        self.drain_timeout_s = drain_timeout_s
        self._outage = Backoff(first=0.5, cap=10.0)
        self._outage_reason: str | None = None
        self._signalled_at: float | None = None  # the loop's time of SIGTERM/SIGINT

    def handle_sig(self, signum: Any) -> None:
        """arq's, after stopping the consumer at once: its batches in flight settle while
        arq winds its jobs down, and its drain bound counts from the signal."""
        if self._signalled_at is None:
            self._signalled_at = asyncio.get_running_loop().time()
        consumer: Consumer | None = self.ctx.get("consumer")
        if consumer is not None:
            consumer.stop()
        super().handle_sig(signum)

    def _left_of_bound(self) -> float:
        if self._signalled_at is None:
            return self.drain_timeout_s
        return self.drain_timeout_s - (asyncio.get_running_loop().time() - self._signalled_at)

    async def main(self) -> None:
        """arq's, on a pool that keeps arq's keys under ``key_prefix`` too (``build_worker``
        gives ``REFSTREAM_STREAM_PREFIX``; see ``workers.host.arq_redis``): the pool is made
        here, so arq's ``main`` uses it. Without a prefix, arq's own global keys."""
        if self._pool is None and self.key_prefix is not None:
            pool = await create_pool(
                self.redis_settings,
                job_serializer=self.job_serializer,
                job_deserializer=self.job_deserializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
            self._pool = arq_redis.wrap(pool, self.key_prefix)
        await super().main()

    async def _poll_iteration(self) -> None:
        # arq ends its poll loop by cancelling it on SIGTERM; a cancel lost in one of its Redis
        # calls (workers/group/stopping.py) would have it poll on, and the process never close
        if self._signalled_at is not None:
            raise asyncio.CancelledError
        try:
            await super()._poll_iteration()
        except Exception as exc:
            reason = redis_outage(exc)
            if reason is None:
                raise
            if reason != self._outage_reason:  # one line per state, not per poll
                log.warning("arq.redis_unavailable", reason=reason, error=exc)
                self._outage_reason = reason
            await self._outage.sleep()
        else:
            if self._outage_reason is not None:
                log.info("arq.redis_available")
                self._outage_reason = None
            self._outage.reset()

    async def close(self) -> None:
        """Make sure ``on_shutdown`` runs, so the consumer commits and acks its batch in
        flight: arq's own close re-raises the CancelledError of a job it cancelled on
        SIGTERM (a webhook delivery, a cron), and deletes its health key first, which fails
        with Redis away; either would skip our shutdown."""
        # the jobs arq cancelled on the signal, waited for within the drain bound (one whose
        # cancel was lost runs to its end, which may be far): the consumer's shutdown next
        unfinished = await stopping.settle(self.tasks.values(), max(self._left_of_bound(), stopping.CANCEL_GRACE_S))
        if unfinished:
            log.warning("arq.jobs_unfinished", jobs=[stopping.waiting_at(t) for t in unfinished])
        self.tasks.clear()
        try:
            await super().close()
        except Exception as exc:
            if redis_outage(exc) is None:
                raise
            log.warning("arq.close_failed", error=exc)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)


def build_worker(settings: Settings) -> Worker:
    keys = Keys(settings.stream_prefix, settings.partitions)
    return ResilientWorker(
        functions=[webhooks.deliver_webhook_job, replay.REPLAY_JOB],
        cron_jobs=[
            cron(refresh_links, minute=set(range(0, 60, 10)), second=7, run_at_startup=True, timeout=600),
            cron(webhooks.sweep_webhooks, second=30, run_at_startup=True, timeout=60),
            cron(fold_drops, second=set(range(0, 60, settings.drops_fold_every_s)), timeout=60),
            cron(approve_commissions, second=45, run_at_startup=True, timeout=60),
            cron(sweep_erasures, second=set(range(3, 60, settings.erase_sweep_every_s)), timeout=3600),
        ],
        # at start too: wait for Redis as long as it takes, never give up and exit
        redis_settings=arq_redis.redis_settings(settings, wait=True),
        key_prefix=settings.stream_prefix,  # arq's job, result, retry, in-progress and abort keys
        drain_timeout_s=settings.drain_timeout_s,
        queue_name=keys.arq_queue,
        health_check_key=f"{keys.arq_queue}:health-check",
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings},
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        handle_signals=True,
        keep_result=0,
    )
