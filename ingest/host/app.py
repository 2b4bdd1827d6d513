"""The edge's aiohttp application factory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.contract import clock, erasure, heap, links
from ingest.contract.connections import Redis, connect_redis, create_pg_pool, pg_unavailable
from ingest.contract.drops import DropTally
from ingest.contract.events import unique_token
from ingest.contract.keys import Keys
from ingest.contract.layout import Watch
from ingest.contract.logs import CURRENT_REQUEST, DEFAULT_ACCESS_LOG, AccessLog, RequestLog, error_fields
from ingest.contract.settings import Settings
from ingest.edge import lookup
from ingest.edge.auth import Authenticator
from ingest.edge.batcher import RedisBatcher
from ingest.edge.body import CLOSE
from ingest.edge.documented import documented
from ingest.edge.idempotency import Idempotency
from ingest.edge.metrics import EdgeMetrics
from ingest.edge.ratelimit import RateLimiter
from ingest.edge.routes import affitor, affixo, batch, biore, bricqs, browser, dub, refport
from ingest.edge.state import EDGE, Edge
from ingest.host import cors, health, openapi, paths
from ingest.host.guard import GUARD, ConnectionGuard
from ingest.host.siblings import SIBLINGS
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


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= 64 and given.isascii() and given.isprintable():
        return given
    return unique_token()


def route_of(request: web.Request) -> str:
    """What a log line says of a request's target: the route's template
    (``/v1/customers/{external_id}``), never its path or query, which may name a person."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _unexpected(request: web.Request, exc: Exception) -> web.Response:
    if pg_unavailable(exc):
        # a route's own handling missed a database outage (read-only, not migrated, ...):
        # "try again", never a 500 for what is not the request's fault
        log.warning("request.postgres_unavailable", route=route_of(request), error=type(exc).__name__)
        return web.Response(body=UNAVAILABLE, status=503, content_type="application/json", headers={"Retry-After": "1"})
    # the error's kind and where it was raised, never its message: a database error's text
    # quotes the value it refused, which may be a person's id, address or email
    log.error("request.failed", method=request.method, route=route_of(request), **error_fields(exc))
    return web.Response(body=INTERNAL, status=500, content_type="application/json")


async def _unmatched(request: web.Request, exc: web.HTTPException) -> tuple[web.Request, web.StreamResponse, bool]:
    """A request the router found nothing for: under the one path rule (``ingest.host.paths``:
    no trailing or doubled slash) it is answered as if sent so, a preflight included; what
    still matches nothing is the router's 404 or 405 in JSON. The request answered, its
    answer, and whether it carries the public routes' CORS headers."""
    again = await paths.alias(request)
    if again is None:
        return request, paths.refusal(exc), False
    public = cors.is_public(again.path)
    if public and again.method == "OPTIONS":
        return again, cors.preflight(again), False
    if again.match_info.http_exception is not None:
        return again, paths.refusal(again.match_info.http_exception), False
    try:
        return again, await again.match_info.handler(again), public
    except web.HTTPException:
        raise  # a handler's own, as on its own path
    except Exception as error:  # as the middleware answers it: never a trace
        return again, _unexpected(again, error), False


UNAVAILABLE = orjson.dumps({"error": "service_unavailable"})
INTERNAL = orjson.dumps({"error": "internal_error"})


def edge_middleware(
    metrics: EdgeMetrics, access: AccessLog = DEFAULT_ACCESS_LOG, guard: ConnectionGuard | None = None
) -> Middleware:
    """The edge's one middleware, around every request: its id (from ``X-Request-ID`` when
    the client sent a sane one, else minted; echoed, and on every line logged while it
    runs), CORS on the public routes (``ingest.host.cors``), the connection guard, metrics by
    route and status for every request, the access line as ``access`` says, and an
    unexpected error as a bare 500 (503 for a database outage), never a trace. A request
    whose body was refused (too large, too slow, unreadable) closes its connection once
    answered. A path the router found nothing for is tried under the one path rule
    (``ingest.host.paths``), on that error path alone. One middleware, not a chain: each
    layer costs a call per request."""
    observe = metrics.requests.observe

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        rid = _request_id(request)
        if guard is not None:
            guard.busy(request.protocol)
        token = CURRENT_REQUEST.set(RequestLog(rid))
        public = cors.is_public(request.path)
        try:
            if public and request.method == "OPTIONS":  # a preflight (tracker.js sends text/plain: it needs none)
                response: web.StreamResponse = cors.preflight(request)
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    status = exc.status
                    if exc is not request.match_info.http_exception:
                        raise  # a handler's own
                    # the router found nothing: the path under the one rule, or a JSON 404
                    request, response, public = await _unmatched(request, exc)
                except Exception as exc:
                    response = _unexpected(request, exc)
                    public = False
                if public:
                    response.headers.update(cors.HEADERS)
                # a refused body is always answered 4xx: only then is the flag looked up
                if response.status >= 400 and request.get(CLOSE) and not response.prepared:
                    response.force_close()
            status = response.status
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            seconds = time.perf_counter() - start
            route = route_of(request)
            observe(route, status, seconds)
            if access.wants(status):
                ms = round(seconds * 1000, 3)
                log.info("request", method=request.method, route=route, status=status, ms=ms)
            CURRENT_REQUEST.reset(token)  # what the connection logs next is not this request's
            if guard is not None:
                guard.idle(request.protocol)

    return middleware


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
    spool.start(  # also drains what a previous run left; an erased person's rows go scrubbed
        redis,
        every_s=settings.spool_drain_every_s,
        reached=batcher.down.probe_now,
        layout=watch,
        ledger=lambda: erasure.held(pg),
    )
    metrics.watch_spool(spool)
    app[EDGE] = edge = _edge(settings, keys, redis, batcher, pg, spool, metrics, watch, durability)
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
    # the batch route takes the largest bodies; every other route checks its own, smaller cap
    cap = max(settings.max_body_bytes, settings.batch_max_bytes)
    metrics = EdgeMetrics()
    guard = ConnectionGuard(settings.header_timeout_s, settings.keepalive_timeout_s)
    app = web.Application(
        client_max_size=cap, middlewares=[edge_middleware(metrics, AccessLog.parse(settings.access_log), guard)]
    )
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
        app.add_routes(module.routes)
    app.router.add_get("/metrics", metrics_route)
    return app
