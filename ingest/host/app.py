"""The edge's aiohttp application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.contract import clock, erasure, heap, links
from ingest.contract.connections import Redis, connect_redis, create_pg_pool
from ingest.contract.drops import DropTally
from ingest.contract.keys import Keys
from ingest.contract.layout import Watch
from ingest.contract.logs import AccessLog
from ingest.contract.settings import Settings
from ingest.edge import lookup
from ingest.edge.auth import Authenticator
from ingest.edge.batcher import RedisBatcher
from ingest.edge.documented import documented
from ingest.edge.idempotency import Idempotency
from ingest.edge.metrics import EdgeMetrics
from ingest.edge.ratelimit import RateLimiter
from ingest.edge.routes import affitor, affixo, batch, biore, bricqs, browser, dub, refport
from ingest.edge.state import EDGE, Edge
from ingest.host import health, openapi
from ingest.host.guard import GUARD, ConnectionGuard
from ingest.host.siblings import SIBLINGS
from ingest.host.wrap import Frame
from ingest.ledger.placement import Placement
from ingest.link.durability import Durability
from ingest.manage.routes import bricqs as bricqs_manage
from ingest.manage.routes import commissions, privacy, reads, stats, webhooks
from ingest.manage.routes import keys as keys_manage
from ingest.manage.routes import links as links_manage
from ingest.spool.spool import Spool

log = structlog.get_logger("ingest.app")
PG_CLOSE_S = 10.0  # a stopping edge waits this long for its Postgres connections to come back
# the youngest generation collected after this many net new containers (ingest.contract.heap):
# a request's objects die with it, so only what outlives requests (caches) grows it
EDGE_YOUNG = 10_000


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = connect_redis(settings)
    metrics = app[METRICS]
    # min_size=0: the edge starts (and /readyz says why it is not ready) while Postgres is down
    pg = await create_pg_pool(settings, min_size=0, max_size=4)
    # the event ids minted here, and so their days, follow Redis's clock when ours is off
    # (Postgres's while Redis is away: what a restarted edge spools is on the right day too)
    following = await clock.start_following(redis, settings.clock_skew_max_s, postgres=pg)
    durability = Durability.of(settings)
    batcher = _batcher(settings, redis, metrics, durability)
    keys = Keys(settings.stream_prefix, settings.partitions)
    # the partition count the edge writes, read live (refstream partitions set N)
    watch = Watch(redis, keys, settings.partitions)
    batcher.gone = watch.poke
    watch.start(make=True)
    await watch.ready()
    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, durability=durability)
    placement = Placement.over(settings, pg, max_size=4)  # where each workspace's rows (and ledger) are
    spool.start(  # also drains what a previous run left; an erased person's rows go scrubbed
        redis,
        every_s=settings.spool_drain_every_s,
        reached=batcher.down.probe_now,
        layout=watch,
        ledger=lambda: erasure.held(pg, placement.by_pool),
    )
    metrics.watch_spool(spool)
    app[EDGE] = edge = _edge(settings, keys, redis, batcher, pg, spool, metrics, watch, durability, placement)
    edge.drops.start()
    edge.suppress.start(edge.shards, settings.suppression_refresh_s)
    heap.settle_once(EDGE_YOUNG)  # everything startup built is made: out of the collector's sight
    try:
        yield
    finally:
        await edge.suppress.close()
        following.cancel()
        await edge.drops.close()
        await spool.close()
        await watch.close()
        await batcher.close()
        try:  # a connection never released would hold close() for good: terminated instead
            async with asyncio.timeout(PG_CLOSE_S):
                await pg.close()
        except TimeoutError:
            log.warning("edge.pg_close_timeout", after_s=PG_CLOSE_S)
        await redis.aclose()


def _batcher(settings: Settings, redis: Redis, metrics: EdgeMetrics, durability: Durability) -> RedisBatcher:
    """The edge's micro-batcher on ``redis``, its batches' sizes and times in ``metrics``."""

    def observe(commands: int, seconds: float) -> None:
        metrics.redis_batch.observe(commands)
        metrics.redis_seconds.observe(seconds)

    return RedisBatcher(
        redis,
        max_commands=settings.pipeline_max_commands,
        deadline_s=settings.redis_deadline_ms / 1000,
        max_queued=settings.redis_max_queued,
        durability=durability,
        observe=observe,
    )


def _edge(
    settings: Settings,
    keys: Keys,
    redis: Redis,
    batcher: RedisBatcher,
    pg: asyncpg.Pool,
    spool: Spool,
    metrics: EdgeMetrics,
    watch: Watch,
    durability: Durability,
    placement: Placement,
) -> Edge:
    """The edge's state over what ``_resources`` opened: the key cache, the rate limiters,
    the drops' tally, the idempotency keys and the scripts the requests run."""
    return Edge(
        settings=settings,
        keys=keys,
        redis=redis,
        batcher=batcher,
        pg=pg,
        auth=Authenticator(redis, keys, pg, ttl_s=settings.key_cache_s),
        spool=spool,
        metrics=metrics,
        link_sha=batcher.script(links.SET_IF_NEWER),
        click_limiter=RateLimiter(batcher, "click", limit=settings.click_rate_limit_per_min),
        public_limiter=RateLimiter(batcher, "public", limit=settings.public_rate_limit_per_min),
        key_limiter=RateLimiter(batcher, "key", limit=settings.key_rate_limit_per_min),
        track_click_limiter=RateLimiter(batcher, "trackclick", limit=settings.track_click_rate_limit_per_min),
        drops=DropTally(batcher, settings.stream_prefix),
        idem=Idempotency(
            batcher,
            keys,
            window_s=settings.idempotency_window_s,
            cluster=settings.redis_cluster,
            layout=lambda: watch.layout,
        ),
        placement=placement,
        checked_append=None
        if settings.redis_cluster or durability.waits
        else batcher.script(lookup.CHECKED_APPEND, keeps_memo=True),
    )


@documented("Prometheus metrics (text exposition format)", "Operations", {200: None})
async def metrics_route(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    siblings = request.app.get(SIBLINGS)  # serve --processes N: the whole server's figures
    if siblings is not None:
        body = await siblings.gather(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", EdgeMetrics)


def create_app(settings: Settings) -> web.Application:
    """The edge's app: no middleware; each route in a wrapper of its own, made as it is
    registered from the parts it needs (``ingest.host.wrap``)."""
    # the batch route takes the largest bodies; every other route checks its own, smaller cap
    cap = max(settings.max_body_bytes, settings.batch_max_bytes)
    metrics = EdgeMetrics()
    guard = ConnectionGuard(settings.header_timeout_s, settings.keepalive_timeout_s)
    frame = Frame(metrics, AccessLog.parse(settings.access_log), guard)
    app = web.Application(client_max_size=cap)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[GUARD] = guard
    app.cleanup_ctx.append(_resources)
    for module in (
        health,
        biore,
        bricqs,
        bricqs_manage,
        affitor,
        affixo,
        refport,
        dub,
        batch,
        links_manage,
        keys_manage,
        reads,
        privacy,
        stats,
        commissions,
        webhooks,
        browser,
        openapi,
    ):
        frame.add_routes(app.router, module.routes)
    frame.add_routes(app.router, [web.get("/metrics", metrics_route)])
    frame.close(app.router)  # last: what no route matched
    return app
