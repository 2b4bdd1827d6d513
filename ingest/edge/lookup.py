"""What a request needs to know before it is answered, in one Redis round trip.

A route names its rate limit and subject, and optionally an API key, a link code and
extra commands; ``lookup`` sends all of it through the micro-batcher together and returns
the answers. Postgres is asked only when Redis cannot answer: a key Redis has never seen,
or a link code while the link cache is not yet warm.

A route that would accept the request on what this edge last read for the same keys (the
link, the kill switch) may hand over its event as a ``Guess``: then the round trip is one
script (``CHECKED_APPEND``) that counts the rate limit, reads the keys and appends the
event only if the request is admitted and every key still holds what the guess was made
from: atomically, so exactly what reading, then appending would have done, in one round
trip instead of two. When a key changed (or the limit refused), nothing is appended and
the route goes on from the fresh values as usual. Not on a Redis Cluster (the keys live in
different slots) nor while a durability level waits for replicas or the AOF (a failed
confirmation must not be mistaken for a failed read): there every request takes two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import structlog

from ingest.contract import clicks, clock, links, wire
from ingest.contract.connections import PG_ERRORS, Command
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.events import Envelope
from ingest.edge.auth import Principal
from ingest.edge.enqueue import appended, never_sent, to_spool
from ingest.edge.ratelimit import WINDOW, RateLimiter, Verdict, well_formed
from ingest.edge.state import Edge

log = structlog.get_logger("ingest.lookup")
T = TypeVar("T")


FALLBACK_WAIT_S = 1.0

# ratelimit.WINDOW (KEYS[1], ARGV[1..2]), then: ARGV[3] = E, the number of the entry's
# arguments, ARGV[4..E+3] the entry's fields and values (``Envelope.entry``); ARGV[E+4] = R,
# the number of keys the request reads, KEYS[3..R+2], each expected to hold
# ARGV[E+5..E+R+4] ('' for no value, else '=' and the value); the entry is appended to the
# stream KEYS[2] only if the request was admitted, every key holds what was expected and the
# stream exists (a retired partition is never made again: the route's own append then meets
# ``PartitionGone``), and then each write that rides with it runs: one per remaining key, as (argc, name, args
# after the key...) in the remaining ARGV. Reply: the verdict's three numbers, 1 if
# appended else 0, each read value.
CHECKED_APPEND = (
    WINDOW
    + """
verdict[4] = 0
local e = tonumber(ARGV[3])
local r0 = 4 + e
local reads = tonumber(ARGV[r0])
local same = true
for i = 1, reads do
  local v = rs_get(KEYS[2 + i])
  verdict[4 + i] = v
  if v then
    same = same and ARGV[r0 + i] == '=' .. v
  else
    same = same and ARGV[r0 + i] == ''
  end
end
if verdict[1] == 1 and same and redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 4, 3 + e)) then
  verdict[4] = 1
  local a = r0 + 1 + reads
  for k = 3 + reads, #KEYS do
    local argc = tonumber(ARGV[a])
    local cmd = {ARGV[a + 1], KEYS[k]}
    for j = 2, argc do
      cmd[j + 1] = ARGV[a + j]
    end
    redis.call(unpack(cmd))
    rs_memo[KEYS[k]] = nil
    a = a + argc + 1
  end
end
return verdict
"""
)
SEEN_MAX = 65_536  # keys whose last value this edge remembers (links, flags); cleared when full


class Unavailable(Outage):
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
    appended: bool = False  # the Guess's event is in Redis (at the ack durability level)


@dataclass(frozen=True, slots=True)
class Guess:
    """The event a route will append if what it reads holds what this edge last read
    (``seen``); with its routing key, and the writes that go with it (``append``'s extra
    commands: each a command name, its key, then its other arguments)."""

    envelope: Envelope
    routing_key: str
    also: tuple[Command, ...] = ()


def seen(edge: Edge, key: str) -> bytes | bool | None:
    """What ``key`` held when this edge last read it (None: no value); False: never read."""
    return edge.seen.get(key, False)


def seen_link(edge: Edge, code: str) -> links.LinkInfo | None:
    """The link as this edge last read it from the cache, to make a ``Guess`` from."""
    raw = edge.seen.get(edge.keys.link(code))
    if raw is None:
        return None
    link = _decode_link(edge, raw)
    return link if isinstance(link, links.LinkInfo) else None


def _decode_link(edge: Edge, raw: object) -> links.LinkInfo | links.Missing | None:
    # the same few entries come back again and again: parse each once
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


def remember(edge: Edge, key: str, value: object) -> None:
    """A key a route read by itself (not through ``lookup``): what a later guess is made from."""
    _remember(edge, [key], [value])


def _remember(edge: Edge, keys: list[str], values: list[Any]) -> None:
    if len(edge.seen) + len(keys) > SEEN_MAX:
        edge.seen.clear()
    for key, value in zip(keys, values, strict=True):
        if value is None or isinstance(value, bytes):
            edge.seen[key] = value


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
    guess: Guess | None = None,
    counted: bool = True,
) -> Found:
    """With ``degraded`` (public routes, whose events can be spooled), Redis being down is
    not an error: the request is let through unlimited, extras are None, and the link comes
    from Postgres. Otherwise what Redis raised propagates and the route answers 503.

    ``counted`` off (a HEAD, which changes nothing): the rate limit is neither counted nor
    asked, and the request is admitted; the reads are as ever.

    With ``guess``, and when every key read was read before, the round trip is
    ``CHECKED_APPEND``: ``Found.appended`` says whether the event went in (its route must
    then answer as it would after appending it, and must not append it again)."""
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
    rl_key = edge.keys.ratelimit(limiter.name, subject)
    reads: list[str] = []
    if code is not None:
        reads += [edge.keys.link(code), edge.keys.links_warm]
    if guess is not None and edge.suppress.names(guess.envelope):
        guess = None  # a suppressed event is appended nowhere: the route's own path says so
    gets = _gets(extra)
    if guess is not None and edge.checked_append is not None and not key_miss:
        checked = _checked(edge, limiter, rl_key, guess, reads, gets, len(extra))
        if checked is not None:
            held = [edge.seen.get(key) for key in reads + gets]  # what the guess was made from
            try:
                n_values = len(reads) + len(extra)  # a reply of another shape is another's: never read
                (reply,) = await edge.batcher.execute(
                    checked, durable=True, check=lambda r: well_formed(r[0], flags=1, values=n_values)
                )
            except (NotSent, OutcomeUnknown) as exc:
                if not never_sent(exc):
                    return await _settled(edge, limiter, principal, code, len(reads), held, guess, exc)
                if not degraded or secret is not None:
                    raise
                return await _without_redis(edge, limiter, code, len(extra))
            if not isinstance(reply, Exception):
                return await _answer(edge, limiter, principal, code, reads, gets, list(reply), guess)
            # the script refused as a whole (a full Redis under noeviction, ...): nothing ran;
            # ask again the usual way, which tells the route what to do
    if counted:
        commands.insert(0, limiter.command(rl_key))
    commands += [("GET", key) for key in reads]
    commands += extra

    try:
        replies = await edge.batcher.execute(*commands, check=limiter.check if counted else None) if commands else []
    except (NotSent, OutcomeUnknown):
        if not degraded or secret is not None:
            raise
        return await _without_redis(edge, limiter, code, len(extra))
    try:
        verdict = limiter.verdict(replies[0]) if counted else Verdict(True, limiter.limit, limiter.limit, 0)
    except (NotSent, OutcomeUnknown):
        if not degraded or secret is not None:
            raise
        # the script refused (a full Redis under noeviction, a replica): fail open, as
        # for a Redis that is down; the event itself goes to the spool if Redis refuses it
        verdict = Verdict(True, limiter.limit, limiter.limit, 0)
    found = Found(verdict=verdict, principal=principal)
    i = int(counted)
    if key_miss:
        assert digest is not None
        d = digest
        reply = replies[i]
        if isinstance(reply, bytes):  # Redis knew the key: no Postgres, no need to queue for it
            found.principal = await edge.auth.resolve(d, reply)
        else:
            found.principal = await fallback(edge, lambda: edge.auth.resolve(d, reply))
        i += 1
    _remember(edge, reads, replies[i : i + len(reads)])
    if len(gets) == len(extra):
        _remember(edge, gets, replies[i + len(reads) :])
    if code is not None:
        try:
            found.link = await resolve_link(edge, code, replies[i], replies[i + 1])
        except Unavailable:
            found.link_unresolved = True  # the route decides: refuse, or let the worker decide
        i += 2
    found.extra = replies[i:]
    return found


def _gets(extra: tuple[Command, ...]) -> list[str]:
    """The keys of ``extra`` when it holds only GETs (what a guess can be checked against)."""
    return [cmd[1] for cmd in extra if len(cmd) == 2 and cmd[0] == "GET"]


def _checked(
    edge: Edge, limiter: RateLimiter, rl_key: str, guess: Guess, reads: list[str], gets: list[str], n_extra: int
) -> Command | None:
    keys = reads + gets
    if len(gets) != n_extra:
        return None  # an extra that is not a plain read: the usual way
    expected: list[bytes] = []
    for key in keys:
        value = edge.seen.get(key, False)
        if value is False:
            return None  # never read here: nothing to guess from
        expected.append(b"" if value is None else b"=" + value)  # type: ignore[operator]
    stream = edge.keys.stream_for(guess.routing_key)
    entry = wire.to_entry(guess.envelope)
    also = guess.also  # (a fingerprint cache entry's index among them: ``ingest.edge.erasure_index``)
    writes: list[Any] = []
    for name, _key, *args in also:
        writes += [1 + len(args), name, *args]
    return (
        "EVALSHA",
        edge.checked_append,
        2 + len(keys) + len(also),
        rl_key,
        stream,
        *keys,
        *(cmd[1] for cmd in also),
        limiter.window_ms,
        limiter.limit,
        len(entry),
        *entry,
        len(keys),
        *expected,
        *writes,
    )


async def _answer(
    edge: Edge,
    limiter: RateLimiter,
    principal: Principal | None,
    code: str | None,
    reads: list[str],
    gets: list[str],
    reply: list[Any],
    guess: Guess,
) -> Found:
    found = Found(verdict=limiter.verdict(reply), principal=principal, appended=bool(reply[3]))
    values = reply[4:]
    _remember(edge, reads + gets, values)
    if found.appended:
        appended(edge, guess.envelope)
    if code is not None:
        try:
            found.link = await resolve_link(edge, code, values[0], values[1])
        except Unavailable:
            found.link_unresolved = True
    found.extra = values[len(reads) :]
    return found


async def _settled(
    edge: Edge,
    limiter: RateLimiter,
    principal: Principal | None,
    code: str | None,
    n_reads: int,
    held: list[Any],
    guess: Guess,
    exc: BaseException,
) -> Found:
    """The checked append failed after it was sent (a timeout, a lost connection): the
    script may have appended the guess, or may yet. Never refused while it may count: the
    guess's event is spooled under its ``event_id`` (the workers store one copy), and the
    request goes on as if the script had appended it, on the values the guess was made from
    (``held``), its rate limit uncounted (fail open, as without Redis). ``OutcomeUnknown``
    when the spool cannot keep it."""
    await to_spool(edge, guess.envelope, guess.routing_key, guess.also, maybe_applied=exc)
    found = Found(verdict=Verdict(True, limiter.limit, limiter.limit, 0), principal=principal, appended=True)
    if code is not None:
        try:
            found.link = await resolve_link(edge, code, held[0], held[1])
        except Unavailable:
            found.link_unresolved = True
    found.extra = held[n_reads:]
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
    Postgres (bounded, and the answer cached) only while the cache is not warm, or when the
    link's entry could not be read: an error in its slot (on a Redis Cluster, the node that
    holds it may be failing over while ``links:warm``'s answers) is never "no such code"."""
    link = _decode_link(edge, cached)
    if isinstance(link, links.LinkInfo):
        return link
    if link is links.MISSING or not _storable(code):
        return None
    if isinstance(cached, Exception):
        log.warning("link_cache.read_failed", error=repr(cached))
        return await fallback(edge, lambda: links.fetch(edge.pg, code))  # Unavailable: the route's outage path
    if warm == b"1":
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
    found, pg_now_ms = await fallback(edge, lambda: clicks.in_postgres(edge.pg, click_id))
    if isinstance(found, clicks.ClickRef):
        return found
    now_ms = clock.now_ms() if pg_now_ms is None else pg_now_ms  # the database's time, not this edge's
    if not found and clicks.may_be_pending(click_id, now_ms, edge.settings.click_pending_s):
        log.info("click.pending")  # not its id: a click id names a visitor (docs/privacy.md)
        raise ClickPending(click_id)
    return None
