"""``/healthz``: the process is up. ``/readyz``: Redis and Postgres both answer."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel

from ..state import EDGE

routes = web.RouteTableDef()
READY_TIMEOUT_S = 2.0


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    redis: str
    postgres: str


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    edge = request.app[EDGE]

    async def redis() -> None:
        await edge.redis.ping()

    async def postgres() -> None:
        async with edge.pg.acquire(timeout=READY_TIMEOUT_S) as conn:
            await conn.fetchval("SELECT 1")

    checks = {"redis": redis, "postgres": postgres}
    results = await asyncio.gather(
        *(asyncio.wait_for(fn(), READY_TIMEOUT_S) for fn in checks.values()), return_exceptions=True
    )
    body = {name: "ok" if r is None else f"error: {type(r).__name__}" for name, r in zip(checks, results, strict=True)}
    ready = all(r is None for r in results)
    return web.json_response({"ready": ready, **body}, status=200 if ready else 503)
