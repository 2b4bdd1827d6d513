"""The edge's aiohttp application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from .batcher import RedisBatcher
from .connections import connect_redis, create_pg_pool
from .keys import Keys
from .ratelimit import RateLimiter
from .routes import biore, health
from .settings import Settings
from .state import EDGE, Edge

log = structlog.get_logger("ingest.app")


@web.middleware
async def canonical_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request; an unexpected error becomes a bare 500, never a trace."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        log.exception("request.failed", method=request.method, path=request.path)
        return web.Response(body=orjson.dumps({"error": "internal_error"}), status=500, content_type="application/json")
    finally:
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            ms=round((time.perf_counter() - start) * 1000, 3),
        )


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = connect_redis(settings)
    batcher = RedisBatcher(redis, max_commands=settings.pipeline_max_commands)
    # min_size=0: the edge starts (and /readyz says why it is not ready) while Postgres is down
    pg = await create_pg_pool(settings, min_size=0, max_size=2)
    app[EDGE] = Edge(
        settings=settings,
        keys=Keys(settings.stream_prefix, settings.partitions),
        redis=redis,
        batcher=batcher,
        pg=pg,
        click_limiter=RateLimiter(batcher, limit=settings.click_rate_limit),
    )
    try:
        yield
    finally:
        await batcher.close()
        await pg.close()
        await redis.aclose()


SETTINGS = web.AppKey("settings", Settings)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[canonical_log])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources)
    app.add_routes(health.routes)
    app.add_routes(biore.routes)
    return app
