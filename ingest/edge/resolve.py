"""A link or a click from what Redis answered, else (bounded) from Postgres: what every
lookup (``ingest.edge.lookup``) and the routes that read a click by themselves resolve
their replies with. Postgres is asked only when Redis cannot answer: a link code while the
link cache is not yet warm (or its entry could not be read), a click older than its cache
entry; a question to it that meets anything but an answer is ``Unavailable``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import structlog

from ingest.contract import clicks, clock, links
from ingest.contract.connections import PG_ERRORS
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.edge.state import Edge

log = structlog.get_logger("ingest.lookup")
T = TypeVar("T")

FALLBACK_WAIT_S = 1.0
SEEN_MAX = 65_536  # keys whose last value this edge remembers (links, flags); cleared when full


class Unavailable(Outage):
    """Postgres was needed and did not answer (or too many requests were already asking)."""


class ClickPending(Unavailable):
    """A click id refstream minted recently that neither the click cache nor Postgres knows
    yet: the click may still wait in an edge's spool or a stream. Retryable (a 503 with
    Retry-After), never the permanent 400 of an unknown click."""


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
        log.warning("postgres.unavailable", error=exc, sqlstate=getattr(exc, "sqlstate", None))
        raise Unavailable from exc


def decode_link(edge: Edge, raw: object) -> links.LinkInfo | links.Missing | None:
    """A link cache entry's value, parsed once: the same few entries come back again and again."""
    if isinstance(raw, bytes):
        hit = edge.link_memo.get(raw)
        if hit is not None:
            return hit
    link = links.decode(raw)
    if isinstance(link, links.LinkInfo) and isinstance(raw, bytes):
        if len(edge.link_memo) >= SEEN_MAX:
            edge.link_memo.clear()
        edge.link_memo[raw] = link
    return link


def seen_link(edge: Edge, code: str) -> links.LinkInfo | None:
    """The link as this edge last read it from the cache (``ingest.edge.lookup.seen``), to make
    a ``Guess`` from."""
    raw = edge.seen.get(edge.keys.link(code))
    if raw is None:
        return None
    link = decode_link(edge, raw)
    return link if isinstance(link, links.LinkInfo) else None


def storable(code: str) -> bool:
    """Whether a link can have ``code``: Postgres text cannot hold NUL, so no link has such a
    code; asking would be refused (22021), which a request cannot tell from an outage: a
    client told to retry forever."""
    return "\x00" not in code


async def resolve_link(edge: Edge, code: str, cached: object, warm: object) -> links.LinkInfo | None:
    """A link from the replies to ``GET {prefix}:link:{code}`` and ``GET {prefix}:links:warm``;
    Postgres (bounded, and the answer cached) only while the cache is not warm, or when the
    link's entry could not be read: an error in its slot (on a Redis Cluster, the node that
    holds it may be failing over while ``links:warm``'s answers) is never "no such code"."""
    link = decode_link(edge, cached)
    if isinstance(link, links.LinkInfo):
        return link
    if link is links.MISSING or not storable(code):
        return None
    if isinstance(cached, Exception):
        log.warning("link_cache.read_failed", error=repr(cached))
        return await link_in_postgres(edge, code)  # Unavailable: the route's outage path
    if warm == b"1":
        return None
    # the cache is not (yet) complete: ask Postgres once, and remember the answer (best
    # effort: a cache Redis cannot write now is written by the next request that asks)
    found = await link_in_postgres(edge, code)
    try:
        (reply,) = await edge.batcher.execute(links.cache_command(edge.keys, edge.link_sha, found or code))
    except (NotSent, OutcomeUnknown) as exc:
        reply = exc
    if isinstance(reply, Exception):
        log.warning("link_cache.write_failed", error=repr(reply))
    return found


async def link_in_postgres(edge: Edge, code: str) -> links.LinkInfo | None:
    """The link for ``code`` from Postgres (bounded: ``fallback``), for a request whose
    Redis could not say; None for a code no link can have (``storable``)."""
    if not storable(code):
        return None
    return await fallback(edge, lambda: anywhere(edge, lambda pool: links.fetch(pool, code), _link_owner))


def _link_owner(link: links.LinkInfo) -> str:
    return link.workspace_id


async def anywhere(
    edge: Edge, fn: Callable[[asyncpg.Pool], Awaitable[T | None]], owner: Callable[[T], Any] | None = None
) -> T | None:
    """What ``fn`` finds on the shard that holds it: a lookup by an id unique across shards
    (a link's code, a key's digest, a click id), whose workspace is not yet known; ``owner``
    says found's workspace (``Placement.find``)."""
    found = await edge.shards.find(fn, owner)
    return found[1] if found is not None else None


async def pool_of(edge: Edge, workspace_id: str) -> asyncpg.Pool:
    """The pool of the shard ``workspace_id`` is on."""
    return await edge.shards.pool(workspace_id)


async def _click_anywhere(edge: Edge, click_id: str) -> tuple[clicks.ClickRef | bool, int | None]:
    """``clicks.in_postgres`` on the shard that stored the click; else the directory's answer.
    A shard that fails is passed over: the click found on another is found; found nowhere,
    the failure is raised (its shard may be the one down), never "no such click"."""
    first: tuple[clicks.ClickRef | bool, int | None] | None = None
    failed: Exception | None = None
    pools = await edge.shards.pools()
    for name, pool in pools.items():
        try:
            answer = await clicks.in_postgres(pool, click_id)
        except Exception as exc:  # raised if no other shard has it
            failed = failed or exc
            continue
        ref = answer[0]
        if isinstance(ref, clicks.ClickRef) and len(pools) > 1 and await edge.shards.shard_of(ref.workspace_id) != name:
            continue  # a moved workspace's old copy
        if ref is not False:
            return answer
        first = first or answer
    if failed is not None:
        raise failed
    assert first is not None  # the directory's is always among the pools
    return first


async def resolve_click(edge: Edge, click_id: str, cached: object) -> clicks.ClickRef | None:
    """A click from the reply to ``GET {prefix}:click:{id}``, else (older than its cache
    entry, or accepted before a Redis restart) from Postgres; None for an id that names no
    click. Raises ``ClickPending`` for a recent one nobody knows yet (``clicks.may_be_pending``)."""
    hit = clicks.decode(click_id, cached)
    return hit if hit is not None else await click_in_postgres(edge, click_id)


async def click_in_postgres(edge: Edge, click_id: str) -> clicks.ClickRef | None:
    """``resolve_click`` for a click its cache entry did not name (``clicks.decode``)."""
    found, pg_now_ms = await fallback(edge, lambda: _click_anywhere(edge, click_id))
    if isinstance(found, clicks.ClickRef):
        return found
    now_ms = clock.now_ms() if pg_now_ms is None else pg_now_ms  # the database's time, not this edge's
    if not found and clicks.may_be_pending(click_id, now_ms, edge.settings.click_pending_s):
        log.info("click.pending")  # not its id: a click id names a visitor (docs/privacy.md)
        raise ClickPending(click_id)
    return None
