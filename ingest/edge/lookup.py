"""What a request needs to know before it is answered, in one Redis round trip.

Each route asks the lookup of its kind: an API-key route ``keyed_lookup`` (the key, its
rate limit and, optionally, a link code), a public route ``link_lookup`` (a link code and
its rate limit for the client's address, Redis being down its degraded path), each with
the route's extra commands. Either sends all of it through the micro-batcher together and
returns the answers; both are made of the same steps (``_parse_key`` and ``_authenticate``,
``_round_trip`` and ``_verdict``, ``_take`` and ``_link``, ``_guessed``). Postgres is asked
only when Redis cannot answer: a key Redis has never seen, or a link code while the link
cache is not yet warm (``ingest.edge.resolve``).

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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingest.contract import links, wire
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.events import Envelope
from ingest.edge.auth import Principal
from ingest.edge.enqueue import appended, never_sent, to_spool
from ingest.edge.problem import Down
from ingest.edge.ratelimit import WINDOW, RateLimiter, Verdict, well_formed
from ingest.edge.resolve import SEEN_MAX, Unavailable, fallback, link_in_postgres, resolve_link
from ingest.edge.state import Edge

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


def remember(edge: Edge, key: str, value: object) -> None:
    """A key a route read by itself (not through ``lookup``): what a later guess is made from."""
    _remember(edge, [key], [value])


def _remember(edge: Edge, keys: list[str], values: list[Any]) -> None:
    if len(edge.seen) + len(keys) > SEEN_MAX:
        edge.seen.clear()
    for key, value in zip(keys, values, strict=True):
        if value is None or isinstance(value, bytes):
            edge.seen[key] = value


def key_subject(digest: bytes) -> str:
    """Rate-limit subject of a key: part of its hash, never the key."""
    return "k" + digest.hex()[:24]


@dataclass(frozen=True, slots=True)
class _Key:
    """An API key as this edge knows it: its hash, whom it names when cached, and whether
    Redis must be asked (``miss``: not cached here)."""

    digest: bytes
    principal: Principal | None
    miss: bool


@dataclass(frozen=True, slots=True)
class _Ask:
    """What one request reads in its round trip: its rate limit's key, the link's keys (for
    a code: the entry and ``links:warm``), the route's extra commands and, of those, the
    keys they read when they are plain GETs (what a guess can be checked against)."""

    edge: Edge
    limiter: RateLimiter
    rl_key: str
    code: str | None
    reads: list[str]
    extra: tuple[Command, ...]
    gets: list[str]


async def key_lookup(edge: Edge, secret: str) -> Found:
    """A keyed route's caller and nothing else (a sale, a refund, a batch): whom ``secret``
    names (Redis, else Postgres) and its rate limit (``edge.key_limiter``, counted under
    the key's hash), in one round trip; no link, no guess. ``Down``, the route's 503, when
    Redis or Postgres cannot say."""
    digest, principal, hit = edge.auth.cached(secret)
    limiter = edge.key_limiter
    commands: list[Command] = [limiter.command(edge.keys.ratelimit(limiter.name, key_subject(digest)))]
    if not hit:
        commands.append(("GET", edge.auth.redis_key(digest)))
    try:
        replies = await edge.batcher.execute(*commands, check=limiter.check)
        found = Found(verdict=limiter.verdict(replies[0]), principal=principal)
        if not hit:
            found.principal = await _authenticate(edge, digest, replies[1])
    except Unavailable as exc:
        raise Down() from exc
    except (NotSent, OutcomeUnknown, Outage) as exc:
        raise Down(exc) from exc
    return found


async def keyed_lookup(
    edge: Edge,
    limiter: RateLimiter,
    secret: str,
    *,
    code: str | None = None,
    extra: tuple[Command, ...] = (),
    guess: Guess | None = None,
    counted: bool = True,
) -> Found:
    """An API-key route's lookup: whom ``secret`` names (Redis, else Postgres), its rate
    limit (counted under the key's hash), the link for ``code`` and the ``extra`` commands.
    What Redis raised propagates: the route answers 503.

    ``counted`` off (a HEAD, which changes nothing): the rate limit is neither counted nor
    asked, and the request is admitted; the reads are as ever.

    With ``guess``, a cached key, and when every key read was read before, the round trip
    is ``CHECKED_APPEND``: ``Found.appended`` says whether the event went in (its route must
    then answer as it would after appending it, and must not append it again)."""
    key = _parse_key(edge, secret)
    ask = _ask(edge, limiter, key_subject(key.digest), code, extra)
    if guess is not None and not key.miss:
        guessed = await _guessed(ask, guess, key.principal, _raise)
        if guessed is not None:
            found, reply = guessed
            if reply is not None:
                found.verdict = ask.limiter.verdict(reply)
            return found
    key_get: list[Command] = [("GET", edge.auth.redis_key(key.digest))] if key.miss else []
    replies = await _round_trip(ask, key_get, counted)
    found = Found(verdict=_verdict(ask, replies, counted), principal=key.principal)
    i = int(counted)
    if key.miss:
        found.principal = await _authenticate(edge, key.digest, replies[i])
        i += 1
    return await _take(ask, found, replies[i:])


async def link_lookup(
    edge: Edge,
    limiter: RateLimiter,
    subject: str,
    *,
    code: str | None,
    extra: tuple[Command, ...] = (),
    guess: Guess | None = None,
    counted: bool = True,
) -> Found:
    """A public route's lookup: the link for ``code``, the rate limit ``limiter`` counts for
    ``subject`` (an address) and the ``extra`` commands. The route's events can be spooled,
    so Redis being down is not an error: the request is let through unlimited, extras are
    None, and the link comes from Postgres (``_without_redis``).

    ``counted`` and ``guess`` as for ``keyed_lookup``."""
    ask = _ask(edge, limiter, subject, code, extra)
    guessed = await _guessed(ask, guess, None, lambda exc: _without_redis(ask)) if guess is not None else None
    if guessed is None:
        try:
            replies = await _round_trip(ask, [], counted)
        except (NotSent, OutcomeUnknown):
            return await _without_redis(ask)
        found = await _take(ask, Found(verdict=_admitted(limiter)), replies[int(counted) :])
        guessed = found, replies[0] if counted else None
    found, reply = guessed  # the verdict last, from the rate limit's reply (None: admitted)
    try:
        if reply is not None:
            found.verdict = ask.limiter.verdict(reply)
    except (NotSent, OutcomeUnknown):
        # the script refused (a full Redis under noeviction, a replica): fail open (the
        # verdict stays admitted), as for a Redis that is down; the event itself goes to
        # the spool if Redis refuses it
        pass
    return found


def _parse_key(edge: Edge, secret: str) -> _Key:
    digest, principal, hit = edge.auth.cached(secret)
    return _Key(digest, principal, not hit)


async def _authenticate(edge: Edge, digest: bytes, reply: object) -> Principal | None:
    """Whom a key this edge had not cached names, from Redis's reply to its ``GET``; from
    Postgres (bounded: ``fallback``) when Redis has never seen it."""
    if isinstance(reply, bytes):  # Redis knew the key: no Postgres, no need to queue for it
        return await edge.auth.resolve(digest, reply)
    # one question a key at a time: a burst on a cold key waits for the first one's answer
    return await edge.auth.asked_once(digest, lambda: fallback(edge, lambda: edge.auth.resolve(digest, reply)))


def _ask(edge: Edge, limiter: RateLimiter, subject: str, code: str | None, extra: tuple[Command, ...]) -> _Ask:
    reads = [edge.keys.link(code), edge.keys.links_warm] if code is not None else []
    return _Ask(edge, limiter, edge.keys.ratelimit(limiter.name, subject), code, reads, extra, _gets(extra))


async def _round_trip(ask: _Ask, key_get: list[Command], counted: bool) -> list[Any]:
    """The usual round trip: the rate limit (unless not ``counted``), the key's ``GET``, the
    link's keys, the extra commands; their replies in that order."""
    commands = [ask.limiter.command(ask.rl_key)] if counted else []
    commands += key_get
    commands += [("GET", key) for key in ask.reads]
    commands += ask.extra
    if not commands:
        return []
    return await ask.edge.batcher.execute(*commands, check=ask.limiter.check if counted else None)


def _verdict(ask: _Ask, replies: list[Any], counted: bool) -> Verdict:
    """The rate limit's verdict, from the round trip's first reply; raises what the script
    raised. Not ``counted``: admitted."""
    return ask.limiter.verdict(replies[0]) if counted else _admitted(ask.limiter)


def _admitted(limiter: RateLimiter) -> Verdict:
    return Verdict(True, limiter.limit, limiter.limit, 0)


async def _take(ask: _Ask, found: Found, values: list[Any]) -> Found:
    """``found`` with the reads' answers (``values``: the link's keys', then the extra
    commands'): each plain read remembered (what a later guess is made from), the link
    resolved, the extra commands' replies."""
    if len(ask.gets) == len(ask.extra):
        _remember(ask.edge, ask.reads + ask.gets, values)
    else:
        _remember(ask.edge, ask.reads, values[: len(ask.reads)])
    await _link(ask, found, values)
    found.extra = values[len(ask.reads) :]
    return found


async def _link(ask: _Ask, found: Found, values: list[Any] | None) -> None:
    """The link for the request's code from its keys' values (``values[0]``, ``values[1]``);
    from Postgres when Redis could not be read (``values`` None)."""
    if ask.code is not None:
        try:
            if values is None:
                found.link = await link_in_postgres(ask.edge, ask.code)
            else:
                found.link = await resolve_link(ask.edge, ask.code, values[0], values[1])
        except Unavailable:
            found.link_unresolved = True  # the route decides: refuse, or let the worker decide


def _gets(extra: tuple[Command, ...]) -> list[str]:
    """The keys of ``extra`` when it holds only GETs (what a guess can be checked against)."""
    return [cmd[1] for cmd in extra if len(cmd) == 2 and cmd[0] == "GET"]


async def _raise(exc: BaseException) -> Found:
    raise exc


async def _guessed(
    ask: _Ask, guess: Guess, principal: Principal | None, unsent: Callable[[BaseException], Awaitable[Found]]
) -> tuple[Found, Any] | None:
    """The round trip as ``CHECKED_APPEND`` (the guess's event appended if the request is
    admitted and every key read holds what the guess was made from): what was found, its
    verdict admitted until the caller reads it from the rate limit's reply (beside it; None
    when the limit was not counted), or None for the usual way (no script, a suppressed
    event, a key never read here, an extra that is not a plain read, or the script refused
    as a whole: a full Redis under noeviction, ...; nothing ran). ``unsent``: the caller's
    answer when the script never reached Redis."""
    edge = ask.edge
    if edge.suppress.names(guess.envelope) or edge.checked_append is None:
        return None  # a suppressed event is appended nowhere: the route's own path says so
    checked = _checked(ask, guess)
    if checked is None:
        return None
    held = [edge.seen.get(key) for key in ask.reads + ask.gets]  # what the guess was made from
    n_values = len(ask.reads) + len(ask.extra)  # a reply of another shape is another's: never read
    try:
        replies = await edge.batcher.execute(
            checked, durable=True, check=lambda r: well_formed(r[0], flags=1, values=n_values)
        )
    except (NotSent, OutcomeUnknown) as exc:
        if never_sent(exc):
            return await unsent(exc), None
        return await _settled(ask, principal, held, guess, exc), None
    (reply,) = replies
    if isinstance(reply, Exception):
        return None
    if reply[3]:
        appended(edge, guess.envelope)
    found = Found(verdict=_admitted(ask.limiter), principal=principal, appended=bool(reply[3]))
    return await _take(ask, found, reply[4:]), reply


def _checked(ask: _Ask, guess: Guess) -> Command | None:
    keys = ask.reads + ask.gets
    if len(ask.gets) != len(ask.extra):
        return None  # an extra that is not a plain read: the usual way
    expected: list[bytes] = []
    for key in keys:
        value = ask.edge.seen.get(key, False)
        if value is False:
            return None  # never read here: nothing to guess from
        expected.append(b"" if value is None else b"=" + value)  # type: ignore[operator]
    entry = wire.to_entry(guess.envelope)
    also = guess.also  # (a fingerprint cache entry's index among them: ``ingest.edge.erasure_index``)
    writes: list[Any] = []
    for name, _key, *args in also:
        writes += [1 + len(args), name, *args]
    return (
        "EVALSHA",
        ask.edge.checked_append,
        2 + len(keys) + len(also),
        ask.rl_key,
        ask.edge.keys.stream_for(guess.routing_key),
        *keys,
        *(cmd[1] for cmd in also),
        ask.limiter.window_ms,
        ask.limiter.limit,
        len(entry),
        *entry,
        len(keys),
        *expected,
        *writes,
    )


async def _settled(ask: _Ask, principal: Principal | None, held: list[Any], guess: Guess, exc: BaseException) -> Found:
    """The checked append failed after it was sent (a timeout, a lost connection): the
    script may have appended the guess, or may yet. Never refused while it may count: the
    guess's event is spooled under its ``event_id`` (the workers store one copy), and the
    request goes on as if the script had appended it, on the values the guess was made from
    (``held``), its rate limit uncounted (fail open, as without Redis). ``OutcomeUnknown``
    when the spool cannot keep it. The link is read from ``held`` first: that raises
    nothing (the guess's link, else Postgres's answer or ``link_unresolved``; the cache
    write after it is best effort), so nothing comes between the event and its spool."""
    found = Found(verdict=_admitted(ask.limiter), principal=principal, appended=True)
    await _link(ask, found, held)
    found.extra = held[len(ask.reads) :]
    await to_spool(ask.edge, guess.envelope, guess.routing_key, guess.also, maybe_applied=exc)
    return found


async def _without_redis(ask: _Ask) -> Found:
    # the limit cannot be counted without Redis: fail open, bounded by the spool's cap
    found = Found(verdict=_admitted(ask.limiter), extra=[None] * len(ask.extra), redis_down=True)
    await _link(ask, found, None)
    return found
