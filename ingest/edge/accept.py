"""The steps every tracking route is made of, so each route says only what its dialect
differs in (its body, its event, its refusals, and how it says them: its ``Voice``). A route
is the list of the steps it needs (its module's ``STEPS``), each one function shared by
every route that takes it; none serves two kinds of route through flags.

1. The lookup: ``look`` (a public route) or ``look_keyed`` (an API-key route that reads a
   link or a click): one Redis round trip (``ingest.edge.lookup``) for the key, the rate
   limit, the link and, when the route made a ``Guess`` from what this edge last read, the
   append itself; ``caller`` for a keyed route that reads nothing else (a sale, a refund):
   the Bearer key, the body, the key and its rate limit alone (``lookup.key_lookup``). An
   unreachable Redis or Postgres becomes the route's own 503.
2. The route's refusals, in its own shape, from what the lookup found: on a public route
   ``refusal`` says which of the link's refusals applies (and accounts its drop), and the
   route says it in its own words; every route refuses a code it does not know through
   ``unknown_code``, which keeps it for the console's tail.
3. The event (``event``; a click's with its click id and cache entry, ``click``), then
   ``accepted`` when the guess went in with the lookup; otherwise its append, plain
   (``ingest.edge.enqueue.put``) or under an idempotency key (``ingest.edge.keyed.put_once``,
   which answers a repeat as the first), to the spool where the route may (a public
   route's click), and the answer. An append Redis may hold but cannot confirm is the
   route's 503 with ``Refstream-Outcome: unknown`` (``retry_headers``).

What is decided below the route is raised, never returned beside a value: a refusal as a
``Problem``, the route's 503 as ``Down`` (``ingest.edge.problem``); the route's ``Voice``
renders it in the dialect's shape (``Voice.render``, ``Voice.answers``).

``event`` makes the route's envelope with the client's address and User-Agent, taken the
same way on every route (``header``: a header's text, safe to store).
"""

from __future__ import annotations

import enum
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel

from ingest.contract import clicks
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, Outage, OutcomeUnknown
from ingest.contract.events import Envelope, EventType, uuid7
from ingest.contract.links import LinkInfo
from ingest.edge.auth import Principal, bearer
from ingest.edge.body import BodyError, parse
from ingest.edge.enqueue import retry_headers
from ingest.edge.idempotency import Refuse
from ingest.edge.lookup import Found, Guess, key_lookup, keyed_lookup, link_lookup
from ingest.edge.problem import Down, Problem
from ingest.edge.ratelimit import RateLimiter
from ingest.edge.resolve import ClickPending, Unavailable, click_in_postgres
from ingest.edge.state import EDGE, Edge

log = structlog.get_logger("ingest.accept")
M = TypeVar("M", bound=BaseModel)


Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class Voice:
    """How a route speaks: the name its log lines carry, and its refusals in its own shape."""

    route: str  # e.g. "affitor_click"
    refuse: Refuse  # (status, code, message) -> the route's error response
    unavailable: Callable[[dict[str, str]], web.Response]  # the route's 503, given its headers
    # a dialect whose refusals say more than (status, code, message): a ``Problem`` in its shape
    shape: Callable[[Problem], web.Response] | None = None

    def down(self, exc: BaseException | None = None) -> web.Response:
        """The route's 503 for ``exc``: ``Retry-After``, and where Redis may hold the event,
        ``Refstream-Outcome: unknown`` and its id."""
        if exc is not None:
            log.warning("redis.unavailable", route=self.route, error=exc)
        return self.unavailable(retry_headers(exc))

    def render(self, exc: Problem | Down) -> web.Response:
        """What was raised below the route, in its shape: a ``Problem`` as its refusal (with
        the problem's headers), ``Down`` as its 503 (``down``, for its cause)."""
        if isinstance(exc, Down):
            return self.down(exc.cause)
        if self.shape is not None:
            return self.shape(exc)
        response = self.refuse(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        return response

    def answers(self, handler: Handler) -> Handler:
        """``handler``, with what it raises (``Problem``, ``Down``) rendered in this voice:
        the dialect's exception handler. Any other ``Outage`` that reaches it (a workspace
        whose move outlasts the wait for its fence, ``Moved``) is the route's 503 too."""

        @functools.wraps(handler)
        async def route(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except (Problem, Down) as exc:
                return self.render(exc)
            except Outage as exc:
                return self.render(Down(exc))

        return route


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


def header(request: web.Request, name: str, limit: int) -> str | None:
    """A header's text, safe to store: UTF-8 as sent, bytes that are not UTF-8 (aiohttp hands
    them over as lone surrogates) as U+FFFD, NULs (which Postgres text refuses) dropped."""
    value = request.headers.get(name)
    if not value:
        return None
    if value.isascii():  # most headers: no surrogate to replace, the text as sent
        clean = value.replace("\x00", "")[:limit] if "\x00" in value else value[:limit]
        return clean or None
    raw = value.encode("utf-8", "surrogateescape")  # the bytes the client sent
    clean = raw.decode("utf-8", "replace").replace("\x00", "")[:limit]
    return clean or None


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
    # positional, in the fields' order (type, dialect, payload, workspace_id, ip, user_agent,
    # event_id): half the cost of a call by keyword, once a request
    return Envelope(type, dialect, payload, workspace_id, ip, agent[:limit] if agent else None, event_id or uuid7())


@dataclass(frozen=True, slots=True)
class Click:
    """A click's event, the click id it is known by, and what goes with it in its append:
    the click cache entry a lead names the click by (none for a visitor's earlier click,
    which has one already, nor for a test click)."""

    envelope: Envelope
    click_id: str
    also: tuple[Command, ...]


def click(
    request: web.Request,
    edge: Edge,
    dialect: str,
    link: LinkInfo,
    code: str,
    fields: dict[str, Any],
    *,
    ip: str | None,
    prior: clicks.ClickRef | None = None,
    user_agent: str | None = None,
) -> Click:
    """Every click route's event (``event``): its click id minted from its event id, or the
    visitor's earlier click's with its visitor (``prior``); its payload the code, the click
    and visitor ids, then the dialect's ``fields``; and its click cache entry, until the
    link's cookie window ends."""
    event_id = uuid7()
    click_id = prior.click_id if prior else clicks.mint(event_id)
    payload = {"code": code, "click_id": click_id, "visitor_id": prior.visitor_id if prior else click_id, **fields}
    envelope = event(
        request,
        edge,
        EventType.CLICK,
        dialect,
        link.workspace_id,
        payload,
        ip=ip,
        event_id=event_id,
        user_agent=user_agent,
    )
    if prior is not None or fields.get("test_mode"):
        return Click(envelope, click_id, ())
    ref = clicks.ClickRef(click_id, code, link.workspace_id, click_id, envelope.received_at_ms)
    return Click(envelope, click_id, (ref.cache_command(edge.keys, link.cookie_window_days * 86400),))


async def prior_click(edge: Edge, click_id: str | None, cached: object, workspace_id: str) -> clicks.ClickRef | None:
    """The visitor's earlier click a click route names (Affitor's ``existing_click_id``),
    from Redis's reply to its ``GET`` (``cached``), else Postgres: its click id and visitor
    are kept by the new click (``click``'s ``prior``). None when it names none of
    ``workspace_id``'s clicks, or one not known yet (still spooled?): the new click then
    gets an id of its own, never a 503. ``Down`` (the route's 503) when neither could say."""
    if click_id is None:
        return None
    try:  # ``resolve_click``: the cache entry, else Postgres
        prior = clicks.decode(click_id, cached) or await click_in_postgres(edge, click_id)
    except ClickPending:
        return None
    except Unavailable as exc:
        raise Down() from exc
    except (NotSent, OutcomeUnknown) as exc:
        raise Down(exc) from exc
    return prior if prior is not None and prior.workspace_id == workspace_id else None


@dataclass(frozen=True, slots=True)
class Admitted:
    """Who a keyed route's refusals let through: the caller's key, the request's
    ``Idempotency-Key``, and for a route that looks for a link in the caller's workspace,
    the one the lookup found there (None: none, or not looked for)."""

    principal: Principal
    idem_key: str | None
    link: LinkInfo | None = None


# a keyed route's refusals, in its own order: (request, edge, found, the body's problem, the
# body) -> whom it admits; else raises its refusal (a ``Problem``, rendered in its voice)
Refusals = Callable[[web.Request, Edge, Found, BodyError | None, BaseModel | None], Admitted]


@dataclass(frozen=True, slots=True)
class Caller(Generic[M]):
    """A keyed route's start that refused nothing: the edge, the lookup, the body as its
    model, and whom the route's refusals admitted."""

    edge: Edge
    found: Found
    body: M
    admitted: Admitted


async def caller(request: web.Request, model: type[M], refusals: Refusals) -> Caller[M]:
    """A keyed route's start when it reads nothing but its caller: the Bearer key (401), the
    body as ``model``, the key and its rate limit (``key_lookup``), and the route's
    ``refusals`` in its own order; the ``Caller``. Raises the refusal (``Problem``) or the
    503 (``Down``)."""
    edge, secret = keyed(request)
    if secret is None:
        raise Problem(401, "unauthorized", "Invalid or missing API key")
    body, problem = await parsed(request, model)
    found = await key_lookup(edge, secret)
    admitted = refusals(request, edge, found, problem, body)
    assert body is not None
    return Caller(edge, found, body, admitted)


async def look_keyed(
    edge: Edge,
    secret: str,
    *,
    code: str | None = None,
    extra: tuple[Command, ...] = (),
    guess: Guess | None = None,
) -> Found:
    """``keyed_lookup`` under the key's own rate limit (``edge.key_limiter``), for a keyed
    route that reads a link or a click too; ``Down`` (the route's 503) when Redis (or
    Postgres, for a key or a cold link) cannot say."""
    return await _or_down(keyed_lookup(edge, edge.key_limiter, secret, code=code, extra=extra, guess=guess))


async def look(
    edge: Edge,
    limiter: RateLimiter,
    subject: str,
    code: str | None,
    *,
    extra: tuple[Command, ...] = (),
    guess: Guess | None = None,
    counted: bool = True,
) -> Found:
    """A public route's lookup, ``link_lookup`` (Redis down is its degraded path, not an outage);
    ``Down`` (the route's 503) when what it needed still could not be said."""
    return await _or_down(link_lookup(edge, limiter, subject, code=code, extra=extra, guess=guess, counted=counted))


async def _or_down(lookup: Awaitable[Found]) -> Found:
    try:
        return await lookup
    except Unavailable as exc:
        raise Down() from exc
    except (NotSent, OutcomeUnknown, Outage) as exc:  # Redis, or the spool a guess went to
        raise Down(exc) from exc


class Refusal(enum.Enum):
    """Why a public route does not take an event for the link the lookup found."""

    RATE_LIMITED = "rate_limited"
    UNRESOLVED = "unresolved"  # Postgres down while the link cache is cold: the link is unknown
    UNKNOWN_CODE = "unknown_code"
    UNCONFIGURED = "unconfigured"  # the link lost its partner or program
    INACTIVE = "inactive_link"
    ORIGIN = "origin_not_allowed"  # an Origin the link's workspace does not list


def refusal(
    edge: Edge, route: str, code: str | None, found: Found, origin: str | None, *, configured: bool = True
) -> Refusal | None:
    """The first refusal that applies to a public request for ``found.link`` (looked up by
    ``code`` on ``route``), in the order every public route keeps (the rate limit, a link
    nobody could look up, an unknown code, one that lost its partner or program, an
    inactive one, the ``Origin``); None when the event is to be taken. The refused event is
    accounted as a drop (``ingest.contract.drops``; not ``UNRESOLVED``: the link is not
    known to be wrong), an unknown code by ``unknown_code``. ``configured=False``: a route
    that takes clicks on a link without partner or program (the worker decides)."""
    link = found.link
    if not found.verdict.allowed:
        edge.drops.note(link.workspace_id if link else None, link.id if link else None, "rate_limited")
        return Refusal.RATE_LIMITED
    if found.link_unresolved:
        return Refusal.UNRESOLVED
    if link is None:
        unknown_code(edge, route, code)
        return Refusal.UNKNOWN_CODE
    if configured and not link.configured:
        edge.drops.note(link.workspace_id, link.id, "inactive_link")
        return Refusal.UNCONFIGURED
    if not link.active:
        edge.drops.note(link.workspace_id, link.id, "inactive_link")
        return Refusal.INACTIVE
    if not link.allows_origin(origin):
        return Refusal.ORIGIN
    return None


def unknown_code(
    edge: Edge, route: str, code: str | None, workspace: str | None = None, link_id: str | None = None
) -> None:
    """Every route's refusal of a link code it does not know: a drop (``unknown_code``) and,
    for a code that was sent, a line in the console's tail with the route that refused it
    (``DropTally.refused``, docs/console.md)."""
    edge.drops.note(workspace, link_id, "unknown_code")
    if code:
        edge.drops.refused(code, route)


def accepted(body: bytes, headers: dict[str, str] | None) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers=headers)
