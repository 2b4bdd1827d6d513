"""The accept pipeline every tracking route shares, so each route says only what its
dialect differs in (its body, its event, its refusals, and how it says them: its ``Voice``).

1. ``look``: one Redis round trip (``ingest.edge.lookup``) for the key, the rate limit, the
   link and, when the route made a ``Guess`` from what this edge last read, the append
   itself; an unreachable Redis or Postgres becomes the route's own 503.
2. The route's refusals, in its own shape, from what the lookup found.
3. ``accepted`` when the guess went in with the lookup; otherwise ``append``: the event
   with or without an idempotency key (``ingest.edge.keyed``), to the spool where the route
   may (a public route's click), and the answer. An append Redis may hold but cannot
   confirm is the route's 503 with ``Refstream-Outcome: unknown`` (``retry_headers``).

``event`` makes the route's envelope with the client's address and User-Agent, taken the
same way on every route.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract.connections import REDIS_ERRORS, Command
from ingest.contract.events import Envelope, EventType, uuid7
from ingest.edge.auth import bearer
from ingest.edge.body import BodyError, header, parse
from ingest.edge.enqueue import append as append_event
from ingest.edge.enqueue import retry_headers
from ingest.edge.idempotency import Answer, Claim, Refuse, replay
from ingest.edge.keyed import append_keyed
from ingest.edge.lookup import Found, Unavailable, lookup
from ingest.edge.ratelimit import RateLimiter
from ingest.edge.state import EDGE, Edge
from ingest.spool.spool import SpoolFull

log = structlog.get_logger("ingest.accept")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Voice:
    """How a route speaks: the name its log lines carry, and its refusals in its own shape."""

    route: str  # e.g. "affitor_click"
    refuse: Refuse  # (status, code, message) -> the route's error response
    unavailable: Callable[[dict[str, str]], web.Response]  # the route's 503, given its headers

    def down(self, exc: BaseException | None = None) -> web.Response:
        """The route's 503 for ``exc``: ``Retry-After``, and where Redis may hold the event,
        ``Refstream-Outcome: unknown`` and its id."""
        if exc is not None:
            log.warning("redis.unavailable", route=self.route, error=str(exc))
        return self.unavailable(retry_headers(exc))


def keyed(request: web.Request) -> tuple[Edge, str | None]:
    """The edge, and the request's ``Authorization: Bearer`` key (None: the route's 401)."""
    return request.app[EDGE], bearer(request.headers.get("Authorization"))


async def parsed(request: web.Request, model: type[M]) -> tuple[M | None, BodyError | None]:
    """The body as ``model``, or why not: a keyed route authenticates and rate-limits first,
    and only then says what is wrong with the body."""
    try:
        return await parse(request, model), None
    except BodyError as exc:
        return None, exc


def event(
    request: web.Request,
    edge: Edge,
    type: EventType,
    dialect: str,
    workspace_id: str | None,
    payload: dict[str, Any],
    *,
    ip: str | None,
    event_id: uuid.UUID | None = None,
    user_agent: str | None = None,
) -> Envelope:
    """The route's event: its User-Agent the body's where the dialect sends one, else the
    header's, capped at ``REFSTREAM_MAX_STRING_LENGTH`` like every stored string."""
    limit = edge.settings.max_string_length
    agent = user_agent or header(request, "User-Agent", limit)
    return Envelope(
        event_id=event_id or uuid7(),
        type=type,
        dialect=dialect,
        workspace_id=workspace_id,
        ip=ip,
        user_agent=agent[:limit] if agent else None,
        payload=payload,
    )


async def look(edge: Edge, voice: Voice, limiter: RateLimiter, key: str, **kw: Any) -> Found | web.Response:
    """``lookup``, or the route's 503 when Redis (or, for a cold link, Postgres) cannot say."""
    try:
        return await lookup(edge, limiter, key, **kw)
    except Unavailable:
        return voice.down()
    except REDIS_ERRORS as exc:
        return voice.down(exc)


def accepted(body: bytes, headers: dict[str, str] | None) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers=headers)


async def append(
    edge: Edge,
    voice: Voice,
    envelope: Envelope,
    code: str,
    answer: bytes,
    headers: dict[str, str] | None,
    *extra: Command,
    claim: Claim | None,
    spool: bool,
) -> web.Response:
    """Append the event (with ``extra`` in its round trip) and answer ``answer``; with a
    ``claim``, a repeat of the key gets the first request's answer (422 if it asked
    something else). ``spool``: Redis down, the event goes to the spool (a public route's
    click); otherwise that is the route's 503."""
    try:
        if claim is None:
            await append_event(edge, envelope, code, *extra, spool=spool)
        else:
            first = await append_keyed(
                edge, claim, envelope, code, Answer(200, answer, claim.fingerprint), *extra, spool=spool
            )
            if first is not None:
                return replay(first, claim, voice.refuse, headers)
    except (*REDIS_ERRORS, SpoolFull) as exc:
        return voice.down(exc)
    return accepted(answer, headers)
