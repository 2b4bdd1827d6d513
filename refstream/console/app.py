"""The console's aiohttp app: static pages, the JSON under ``/api/``, and the headers every
answer carries.

The pages are public files with nothing in them; every datum comes from ``/api/``, which
asks for the operator's token (``operator``) or a workspace key of scope ``read``
(``tenant``) in ``Authorization: Bearer``. The Content-Security-Policy allows scripts and
styles from the console itself only, no inline script, no framing: together with pages
that write every value as text (``textContent``), a payload holding markup shows as
markup's text and runs nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ingest.contract.connections import PG_ERRORS, REDIS_ERRORS, connect_redis, create_pg_pool
from ingest.contract.errors import Refused
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from ingest.edge.auth import Principal
from ingest.ledger import placement
from workers.ops import dead
from workers.ops.replay_source import RangeError

from . import actions, tail, views
from .access import Access, refused
from .ring import Sampler

STATIC = Path(__file__).parent / "static"
PAGES = ("pipeline", "tail", "dead", "replay", "erasures", "links")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
TAILS_AT_ONCE = 4  # tail reads in flight, over every open page
TAIL_FRESH_S = 0.25  # pages polling the same filter within this share one read

ACCESS = web.AppKey("access", Access)
SAMPLER = web.AppKey("sampler", Sampler)
REPLAYS = web.AppKey("replays", actions.Replays)
TAILS = web.AppKey("tails", asyncio.Semaphore)
ACTING = web.AppKey("acting", asyncio.Lock)  # a retry or a drop of dead letters in progress
TAIL_READS = web.AppKey("tail_reads", dict)
CONTEXT = web.AppKey("context", dict)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def _bad(detail: str, status: int = 400) -> web.Response:
    return _json({"error": "invalid_request", "detail": detail}, status)


def operator(handler: Handler) -> Handler:
    async def route(request: web.Request) -> web.Response:
        if not request.app[ACCESS].operator(request):
            return refused()
        return await handler(request)

    return route


def tenant(handler: Callable[[web.Request, Principal], Awaitable[web.Response]]) -> Handler:
    async def route(request: web.Request) -> web.Response:
        principal = await request.app[ACCESS].tenant(request)
        if principal is None:
            return refused()
        return await handler(request, principal)

    return route


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=orjson.loads)
    except (ValueError, json.JSONDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


@web.middleware
async def headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer's headers; an outage is a 503 the page shows, never a traceback."""
    try:
        response = await handler(request)
    except (*REDIS_ERRORS, *PG_ERRORS) as exc:
        response = _json({"error": "unavailable", "detail": type(exc).__name__}, 503)
    except web.HTTPException as exc:  # a route not found, a method not allowed: raised on, with the headers
        exc.headers.update(HEADERS)
        raise
    response.headers.update(HEADERS)
    return response


def _ctx(request: web.Request) -> dict[str, Any]:
    return request.app[CONTEXT]


# -- pages ---------------------------------------------------------------------------------


async def page(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("page") or "pipeline"
    if name not in PAGES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / f"{name}.html", headers={"Cache-Control": "no-cache"})


async def access_route(request: web.Request) -> web.Response:
    """Whether operator pages need a token, so a page asks for one before it calls; public
    (a refusal says as much)."""
    return _json({"operator_token": request.app[ACCESS].token_needed})


# -- the operator's API ----------------------------------------------------------------------


@operator
async def pipeline(request: web.Request) -> web.Response:
    since = request.query.get("since", "0")
    if not since.isdigit():
        return _bad("since: milliseconds")
    return _json({"every_s": 2, "samples": request.app[SAMPLER].ring.since(int(since))})


@operator
async def tail_route(request: web.Request) -> web.Response:
    try:
        flt = tail.Filter.parse(request.query)
    except tail.BadFilter as exc:
        return _bad(str(exc))
    return _json(await _tail(request.app, flt))


async def _tail(app: web.Application, flt: tail.Filter) -> dict[str, Any]:
    """One read per filter per ``TAIL_FRESH_S`` whatever the number of open pages (one in
    flight is shared too), at most ``TAILS_AT_ONCE`` at once: ten consoles cost one."""
    reads: dict[tail.Filter, tuple[float, asyncio.Task[dict[str, Any]]]] = app[TAIL_READS]
    now = time.monotonic()
    for old in [f for f, (at, _) in reads.items() if now - at >= TAIL_FRESH_S]:
        del reads[old]  # stale, or a filter no page polls any more
    if flt not in reads:
        reads[flt] = (now, asyncio.create_task(_read_tail(app, flt)))
    return await asyncio.shield(reads[flt][1])


async def _read_tail(app: web.Application, flt: tail.Filter) -> dict[str, Any]:
    c = app[CONTEXT]
    async with app[TAILS]:
        return {
            "accepted": await tail.accepted(c["redis"], c["keys"], flt),
            "outcomes": await tail.outcomes(c["shards"], flt, c["redis"], c["keys"]),
        }


@operator
async def dead_list(request: web.Request) -> web.Response:
    c = _ctx(request)
    return _json(await actions.letters(c["redis"], c["keys"]))


@operator
async def dead_show(request: web.Request) -> web.Response:
    c = _ctx(request)
    try:
        letter = await dead.get(c["redis"], c["keys"], request.match_info["dead_id"])
    except ValueError as exc:
        return _bad(str(exc))
    if letter is None:
        return _json({"error": "not_found"}, 404)
    return _json(letter.detail())


@operator
async def dead_count(request: web.Request) -> web.Response:
    c = _ctx(request)
    flt = actions.letter_filter(await _body(request), c["keys"])
    return _json({"matched": await actions.matching(c["redis"], c["keys"], flt)})


@operator
async def dead_retry(request: web.Request) -> web.Response:
    """One letter (``dead_id``), or every one matching the filter: the page asked for the
    count first and shows it in its confirmation. One retry or drop at a time: a second
    request for the same letter (a double click) finds it gone, never queues it twice."""
    c, body = _ctx(request), await _body(request)
    dead_id = body.get("dead_id")
    async with request.app[ACTING]:
        if isinstance(dead_id, str):
            try:
                dead.check_id(dead_id)
            except ValueError as exc:
                return _bad(str(exc))
            return _json(
                {
                    "dead_id": dead_id,
                    **await actions.retry(c["redis"], c["keys"], ids=[dead_id], flt=None, replicated=c["replicated"]),
                }
            )
        flt = actions.letter_filter(body.get("filter") or {}, c["keys"])
        return _json(await actions.retry(c["redis"], c["keys"], ids=None, flt=flt, replicated=c["replicated"]))


@operator
async def dead_drop(request: web.Request) -> web.Response:
    """One letter (``dead_id``) to the dropped letters: the page confirmed it first."""
    c, body = _ctx(request), await _body(request)
    dead_id = body.get("dead_id")
    if not isinstance(dead_id, str):
        return _bad("dead_id: a dead letter's id")
    try:
        dead.check_id(dead_id)
    except ValueError as exc:
        return _bad(str(exc))
    async with request.app[ACTING]:
        return _json({"dead_id": dead_id, **await actions.drop(c["redis"], c["keys"], dead_id, c["replicated"])})


def _replay_starter(kind: str) -> Handler:
    @operator
    async def start(request: web.Request) -> web.Response:
        replays, body = request.app[REPLAYS], await _body(request)
        running = replays.running()
        if running is not None:
            return _json({"error": "running", "running": running.view()}, 409)
        try:
            rng = actions.replay_range(body)
        except (Refused, RangeError) as exc:
            return _bad(str(exc))
        return _json(replays.start(kind, rng, body).view(), 202)

    return start


@operator
async def replay_state(request: web.Request) -> web.Response:
    run = request.app[REPLAYS].current
    return _json({"run": run.view() if run is not None else None})


@operator
async def erasures(request: web.Request) -> web.Response:
    return _json({"erasures": await views.erasures(_ctx(request)["shards"])})


# -- a tenant's API --------------------------------------------------------------------------


@tenant
async def tenant_links(request: web.Request, principal: Principal) -> web.Response:
    rows = await views.tenant_links(_ctx(request)["shards"], principal.workspace_id)
    return _json({"workspace_id": principal.workspace_id, "days": rows})


# -- the app ---------------------------------------------------------------------------------


def make_app(settings: Settings, *, spool_dirs: list[str]) -> web.Application:
    """The console, with its connections opened and its sampler started on startup."""
    app = web.Application(middlewares=[headers], client_max_size=64 * 1024)
    app[CONTEXT] = {}

    async def resources(app: web.Application) -> AsyncIterator[None]:
        keys = Keys(settings.stream_prefix, settings.partitions)
        redis = connect_redis(settings)
        # no connection made up front: during an outage of Postgres is when the console is
        # needed most, and its charts say "postgres 0" until it answers
        pool = await create_pg_pool(settings, min_size=0, max_size=4)
        # every shard's pool, opened on first use: a tenant's reads on its workspace's shard,
        # the operator's on every shard (ingest.ledger.placement)
        shards = placement.Placement.over(settings, pool, max_size=4)
        # a letter's retry or drop: its XADD on N replicas before the letter's XDEL
        replicated = Replicated(redis, settings.ack_replicas, settings.ack_wait_ms)
        app[CONTEXT].update(redis=redis, pool=pool, keys=keys, shards=shards, replicated=replicated)
        app[ACCESS] = Access(settings.console_token, redis, keys, pool, shards)
        app[SAMPLER] = Sampler(redis, pool, keys, spool_dirs, shards)
        app[REPLAYS] = actions.Replays(settings, redis, shards, keys)
        app[TAILS] = asyncio.Semaphore(TAILS_AT_ONCE)
        app[ACTING] = asyncio.Lock()
        app[TAIL_READS] = {}
        sampling = asyncio.create_task(app[SAMPLER].run())
        try:
            yield
        finally:
            sampling.cancel()
            with suppress(asyncio.CancelledError):
                await sampling
            await asyncio.shield(app[REPLAYS].close())
            await asyncio.shield(shards.close())
            await asyncio.shield(pool.close())
            await asyncio.shield(replicated.aclose())
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    r = app.router
    r.add_get("/", page)
    r.add_get("/{page:[a-z]+}", page)
    r.add_static("/static/", STATIC, append_version=False)
    r.add_get("/api/access", access_route)
    r.add_get("/api/pipeline", pipeline)
    r.add_get("/api/tail", tail_route)
    r.add_get("/api/dead", dead_list)
    r.add_get("/api/dead/{dead_id}", dead_show)
    r.add_post("/api/dead/count", dead_count)
    r.add_post("/api/dead/retry", dead_retry)
    r.add_post("/api/dead/drop", dead_drop)
    r.add_post("/api/replay/dry-run", _replay_starter("dry_run"))
    r.add_post("/api/replay/run", _replay_starter("replay"))
    r.add_get("/api/replay", replay_state)
    r.add_get("/api/erasures", erasures)
    r.add_get("/api/tenant/links", tenant_links)
    return app
