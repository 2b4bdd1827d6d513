"""``/healthz``: the process is up. ``/readyz``: Redis answers, and Postgres answers with
the schema version this build needs.

``/readyz`` names what is wrong (``"postgres": "error: not migrated (schema version 0,
expected 1); run: refstream migrate"``) and answers 503 until it is right. The Postgres
half is cached for ``schema_check.CACHE_S``, so a load balancer polling every instance
often costs Postgres one small query per instance per period.
"""

from __future__ import annotations

import asyncio
from weakref import WeakKeyDictionary

from aiohttp import web
from pydantic import BaseModel

from ingest.edge.documented import documented
from ingest.edge.state import EDGE, Edge
from ingest.manage.schema_check import DbStatus, SchemaProbe, check_pool

routes = web.RouteTableDef()
READY_TIMEOUT_S = 2.0


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    redis: str
    postgres: str


# one probe per running app (and per Edge: an app set up again gets a new pool)
_probes: WeakKeyDictionary[web.Application, tuple[Edge, SchemaProbe]] = WeakKeyDictionary()


def _probe(app: web.Application, edge: Edge) -> SchemaProbe:
    held = _probes.get(app)
    if held is None or held[0] is not edge:
        probe = SchemaProbe(lambda: check_pool(edge.pg, within_s=READY_TIMEOUT_S))
        _probes[app] = held = (edge, probe)
    return held[1]


@routes.get("/healthz")
@documented("The process is up", "Operations", {200: Health})
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
@documented("Redis and Postgres answer", "Operations", {200: Ready, 503: Ready})
async def readyz(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    probe = _probe(request.app, edge)

    async def redis() -> str:
        await asyncio.wait_for(edge.redis.ping(), READY_TIMEOUT_S)
        return "ok"

    async def postgres() -> str:
        status: DbStatus = await probe.status()  # never raises: every failure is a status
        return status.describe()

    results = await asyncio.gather(redis(), postgres(), return_exceptions=True)
    body = {
        name: r if isinstance(r, str) else f"error: {type(r).__name__}"
        for name, r in zip(("redis", "postgres"), results, strict=True)
    }
    ready = all(v == "ok" for v in body.values())
    return web.json_response({"ready": ready, **body}, status=200 if ready else 503)
