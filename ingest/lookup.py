"""What a request needs to know before it is answered, in one Redis round trip.

A route names its rate limit and subject, and optionally an API key, a link code and
extra commands; ``lookup`` sends all of it through the micro-batcher together and returns
the answers. Postgres is asked only when Redis cannot answer: a key Redis has never seen,
or a link code while the link cache is not yet warm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import structlog

from . import clicks, links
from .auth import Principal
from .batcher import Command
from .connections import PG_ERRORS, REDIS_ERRORS
from .events import unique_token
from .ratelimit import RateLimiter, Verdict
from .state import Edge

log = structlog.get_logger("ingest.lookup")
T = TypeVar("T")


FALLBACK_WAIT_S = 1.0


class Unavailable(Exception):
    """Postgres was needed and did not answer (or too many requests were already asking)."""


class ClickPending(Unavailable):
    """A click id refstream minted recently that neither the click cache nor Postgres knows
    yet: the click may still wait in an edge's spool or a stream. Retryable (a 503 with
    Retry-After), never the permanent 400 of an unknown click."""


@dataclass(slots=True)
class Found:
    verdict: Verdict
    principal: Principal | None = None
    link: links.LinkInfo | None = None
    link_unresolved: bool = False  # the code needed Postgres, which did not answer
    extra: list[Any] = field(default_factory=list)
    redis_down: bool = False  # degraded: no limit, no flags, no cache; the link from Postgres


# what a request's question to Postgres can meet instead of an answer: an outage
# (PG_ERRORS), and whatever else Postgres or the driver raise: a database that is not
# migrated (42P01), or not yet migrated to this build's schema (42703, 42883, ...). The
# request cannot tell these apart from an outage and must not answer 500 for them: it
# answers "unavailable" (or takes its degraded path); /readyz names the cause.
_UNANSWERED = (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError)


async def fallback(edge: Edge, query: Callable[[], Awaitable[T]]) -> T:
    """A Postgres query on behalf of a request: few at a time, never waited on for long, so
    a flood of unknown keys or codes cannot take the pool from everything else. Whatever
    keeps Postgres from answering raises ``Unavailable``, logged here as one warning
    (no traceback: the cause is known, and a flood of traces would hide it)."""
    try:
        async with asyncio.timeout(FALLBACK_WAIT_S):
            async with edge.pg_fallbacks:
                return await query()
    except _UNANSWERED as exc:
        log.warning("postgres.unavailable", error=repr(exc), sqlstate=getattr(exc, "sqlstate", None))
        raise Unavailable from exc


def key_subject(digest: bytes) -> str:
    """Rate-limit subject of a key: part of its hash, never the key."""
    return "k" + digest.hex()[:24]


async def lookup(
    edge: Edge,
    limiter: RateLimiter,
    subject: str,
    *,
    secret: str | None = None,
    code: str | None = None,
    extra: tuple[Command, ...] = (),
    degraded: bool = False,
) -> Found:
    """With ``degraded`` (public routes, whose events can be spooled), Redis being down is
    not an error: the request is let through unlimited, extras are None, and the link comes
    from Postgres. Otherwise what Redis raised propagates and the route answers 503."""
    commands: list[Command] = []
    digest: bytes | None = None
    principal: Principal | None = None
    key_miss = False
    if secret is not None:
        digest, principal, hit = edge.auth.cached(secret)
        key_miss = not hit
        subject = key_subject(digest)
        if key_miss:
            commands.append(("GET", edge.auth.redis_key(digest)))
    commands.insert(0, limiter.command(edge.keys.ratelimit(limiter.name, subject), unique_token()))
    if code is not None:
        commands += [("GET", edge.keys.link(code)), ("GET", edge.keys.links_warm)]
    commands += extra

    try:
        replies = await edge.batcher.execute(*commands)
    except REDIS_ERRORS:
        if not degraded or secret is not None:
            raise
        return await _without_redis(edge, limiter, code, len(extra))
    try:
        verdict = limiter.verdict(replies[0])
    except REDIS_ERRORS:
        if not degraded or secret is not None:
            raise
        # the script refused (a full Redis under noeviction, a replica): fail open, as
        # for a Redis that is down; the event itself goes to the spool if Redis refuses it
        verdict = Verdict(True, limiter.limit, limiter.limit, 0)
    found = Found(verdict=verdict, principal=principal)
    i = 1
    if key_miss:
        assert digest is not None
        d = digest
        reply = replies[i]
        if isinstance(reply, bytes):  # Redis knew the key: no Postgres, no need to queue for it
            found.principal = await edge.auth.resolve(d, reply)
        else:
            found.principal = await fallback(edge, lambda: edge.auth.resolve(d, reply))
        i += 1
    if code is not None:
        try:
            found.link = await resolve_link(edge, code, replies[i], replies[i + 1])
        except Unavailable:
            found.link_unresolved = True  # the route decides: refuse, or let the worker decide
        i += 2
    found.extra = replies[i:]
    return found


async def _without_redis(edge: Edge, limiter: RateLimiter, code: str | None, n_extra: int) -> Found:
    # the limit cannot be counted without Redis: fail open, bounded by the spool's cap
    found = Found(verdict=Verdict(True, limiter.limit, limiter.limit, 0), extra=[None] * n_extra, redis_down=True)
    if code is not None and _storable(code):
        try:
            found.link = await fallback(edge, lambda: links.fetch(edge.pg, code))
        except Unavailable:
            found.link_unresolved = True
    return found


def _storable(code: str) -> bool:
    # Postgres text cannot hold NUL, so no link has such a code; asking would be refused
    # (22021), which a request cannot tell from an outage: a client told to retry forever
    return "\x00" not in code


async def resolve_link(edge: Edge, code: str, cached: object, warm: object) -> links.LinkInfo | None:
    """A link from the replies to ``GET {prefix}:link:{code}`` and ``GET {prefix}:links:warm``;
    Postgres (bounded, and the answer cached) only while the cache is not warm."""
    link = links.decode(cached)
    if isinstance(link, links.LinkInfo):
        return link
    if link is links.MISSING or warm == b"1" or not _storable(code):
        return None
    # the cache is not (yet) complete: ask Postgres once, and remember the answer
    found = await fallback(edge, lambda: links.fetch(edge.pg, code))
    (reply,) = await edge.batcher.execute(links.cache_command(edge.keys, edge.link_sha, found or code))
    if isinstance(reply, Exception):
        log.warning("link_cache.write_failed", error=repr(reply))
    return found


async def resolve_click(edge: Edge, click_id: str, cached: object) -> clicks.ClickRef | None:
    """A click from the reply to ``GET {prefix}:click:{id}``, else (older than its cache
    entry, or accepted before a Redis restart) from Postgres; None for an id that names no
    click. Raises ``ClickPending`` for a recent one nobody knows yet (``clicks.may_be_pending``)."""
    hit = clicks.decode(click_id, cached)
    if hit is not None:
        return hit
    found = await fallback(edge, lambda: clicks.in_postgres(edge.pg, click_id))
    if isinstance(found, clicks.ClickRef):
        return found
    if not found and clicks.may_be_pending(click_id, int(time.time() * 1000), edge.settings.click_pending_s):
        log.info("click.pending", click_id=click_id)
        raise ClickPending(click_id)
    return None
