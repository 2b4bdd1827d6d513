"""Seed 000 (bio.re): ``POST /api/v1/referral/click/{code}``.

Public; 60 requests/minute per client IP; a kill switch answers 503
``features.referral_disabled``. Every other outcome is ``200 {"success":true,"data":
{"tracked":true}}``: unknown and inactive codes included (a warn log, nothing counted),
because landing pages must never block on tracking.
"""

from __future__ import annotations

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from .. import flags, links
from ..enqueue import check, xadd
from ..events import Dialect, Envelope, EventType, uuid7
from ..state import EDGE

log = structlog.get_logger("ingest.biore")
routes = web.RouteTableDef()

ROUTE = "biore_click"
MAX_CODE = 128
TRACKED = orjson.dumps({"success": True, "data": {"tracked": True}})


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """bio.re's error shape: ApiResponse with success false and an i18n key as code."""
    body = {"success": False, "error": {"statusCode": status, "code": code, "message": message}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


@routes.post("/api/v1/referral/click/{code}")
async def track_click(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    code = request.match_info["code"]
    ip = edge.client_ip(request)
    event_id = uuid7()
    try:
        rl, flag, cached = await edge.batcher.execute(
            edge.click_limiter.command(edge.keys.ratelimit(ROUTE, ip or "-"), event_id.hex),
            ("GET", edge.keys.flag("referral")),
            ("GET", edge.keys.link(code[:MAX_CODE])),
        )
        verdict = edge.click_limiter.verdict(rl)
        disabled = flags.is_disabled(flag)
    except (RedisError, OSError) as exc:
        # not durable, so not accepted: refuse rather than answer 2xx for a lost event
        log.warning("redis.unavailable", route=ROUTE, error=str(exc))
        return error(503, "service_unavailable", "Try again shortly", {"Retry-After": "1"})

    if disabled:
        return error(503, "features.referral_disabled", "The referral feature is disabled")
    if not verdict.allowed:
        return error(429, "throttle", "Too Many Requests", verdict.headers)

    link = links.decode(cached) if isinstance(cached, bytes | None) else None
    if len(code) > MAX_CODE or not code.isprintable() or link is links.MISSING:
        log.warning("click.unknown_code", code=code[:MAX_CODE], ip=ip)
        return web.Response(body=TRACKED, content_type="application/json", headers=verdict.headers)
    if isinstance(link, links.LinkInfo) and not link.active:
        log.warning("click.inactive_link", code=code, link_id=link.id)
        return web.Response(body=TRACKED, content_type="application/json", headers=verdict.headers)

    # a cache miss is enqueued too: the worker resolves the code in Postgres
    payload = {"code": code}
    if referrer := request.headers.get("Referer"):
        payload["referrer"] = referrer[: edge.settings.max_string_length]
    envelope = Envelope(
        event_id=event_id,
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        workspace_id=link.workspace_id if isinstance(link, links.LinkInfo) else None,
        ip=ip,
        user_agent=(request.headers.get("User-Agent") or "")[: edge.settings.max_string_length] or None,
        payload=payload,
    )
    try:
        (reply,) = await edge.batcher.execute(xadd(edge.keys, envelope, code))
        check(reply)
    except (RedisError, OSError) as exc:
        log.warning("redis.unavailable", route=ROUTE, error=str(exc))
        return error(503, "service_unavailable", "Try again shortly", {"Retry-After": "1"})
    return web.Response(body=TRACKED, content_type="application/json", headers=verdict.headers)
