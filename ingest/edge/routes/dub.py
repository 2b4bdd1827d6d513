"""Dub's tracking API, at Dub's own paths: a Dub user points the SDK's ``server_url`` at the
edge and changes nothing else.

- ``POST /track/lead`` and ``POST /track/sale``: ``Authorization: Bearer`` workspace key
  (scope ``track`` or ``*``); the same lead and sale as Refport's routes
  (``ingest.edge.lead``, ``ingest.edge.sale``: Refport's API is Dub's, field for field),
  answered as Dub answers.
- ``POST /track/click``: client-side click tracking, called from browsers (CORS). The body
  names the link by its ``domain`` and ``key`` (refstream's code); the answer is the click
  id. Nothing secret lives in a web page: the route is authorised as Dub's is, by the
  workspace's allowed hostnames (the request's ``Origin``, else its ``Referer``), and limited
  per client address by its own rate limit (``REFSTREAM_TRACK_CLICK_RATE_LIMIT_PER_MIN``).
  A browser that asks again for the same link within the hour (a reload, a script loaded
  twice) is answered its first click id, and nothing is counted again.

Errors are Dub's: ``{"error": {"code", "message", "doc_url"}}`` with Dub's codes and
statuses (``ingest.edge.dub_shapes``): 400 ``bad_request`` (unreadable JSON, a lead with no
click to go on), 401 ``unauthorized``, 403 ``forbidden`` (a key without the ``track`` scope,
an origin the workspace does not allow), 404 ``not_found`` (an unknown click or link), 422
``unprocessable_entity`` (a field its model refuses), 429 ``rate_limit_exceeded``; 503
with ``Retry-After`` while Redis or Postgres cannot answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Dialect
from ingest.contract.fields import NoNul
from ingest.edge import accept, enqueue, lead, sale
from ingest.edge.bodies import TrackLead
from ingest.edge.body import BodyError, plain
from ingest.edge.documented import BODY, documented, errors
from ingest.edge.dub_shapes import DubError, TrackClickAnswer, TrackLeadAnswer, TrackSaleAnswer, error
from ingest.edge.idempotency import InvalidKey, header_key
from ingest.edge.lookup import Found
from ingest.edge.problem import Problem
from ingest.edge.sale import TrackSale
from ingest.edge.state import EDGE, Edge

routes = web.RouteTableDef()
SEEN_CLICK_S = 3600  # how long a browser's click on a link answers its repeats
CLAIM_MS = 2_000  # how long the request appending a browser's first click holds its claim
CLAIM_POLL_S = 0.02  # how often a double of it looks for the click's id


def _unavailable(headers: dict[str, str]) -> web.Response:
    return error(503, "The service is unavailable; try again shortly", headers)


VOICE = accept.Voice("dub_lead", lambda status, code, message: error(status, message), _unavailable)
SALE_VOICE = accept.Voice("dub_sale", VOICE.refuse, _unavailable)
CLICK_VOICE = accept.Voice("dub_click", VOICE.refuse, _unavailable)


def _problem(problem: BodyError) -> web.Response:
    """A body Dub's API refuses: unreadable JSON is a ``bad_request``, a field its model
    refuses ``unprocessable_entity``; too large, too slow or an unknown encoding keep
    their own status."""
    return error(422 if problem.kind == "invalid" else problem.status, problem.message)


def _caller(
    request: web.Request, edge: Edge, found: Found, problem: BodyError | None, body: BaseModel | None
) -> accept.Admitted:
    """The keyed routes' refusals, in Dub's order: the key, its scope, its rate limit, the
    body, the ``Idempotency-Key`` (raised: ``Problem``, in Dub's words by ``VOICE``); else
    the caller."""
    principal = found.principal
    if principal is None:
        raise Problem(401, "unauthorized", "Unauthorized: invalid or missing API key")
    if not principal.allows("track"):
        raise Problem(403, "forbidden", "The API key lacks the track scope")
    if not found.verdict.allowed:
        edge.drops.note(principal.workspace_id, None, "rate_limited")
        raise Problem(429, "rate_limit_exceeded", "Too many requests", found.verdict.headers)
    if problem is not None or body is None:
        edge.drops.note(principal.workspace_id, None, "invalid")
        if problem is None:
            raise Problem(400, "bad_request", "Invalid body")
        raise Problem(422 if problem.kind == "invalid" else problem.status, problem.kind, problem.message)
    try:
        return accept.Admitted(principal, header_key(request))
    except InvalidKey as exc:
        edge.drops.note(principal.workspace_id, None, "invalid")
        raise Problem(422, "unprocessable_entity", str(exc)) from None


LEAD = lead.LeadDialect(
    Dialect.DUB,
    VOICE,
    _caller,
    lead.dub_answer,
    lambda: error(404, "Click event not found for this clickId"),
    lambda: error(
        400,
        "The `clickId` property was not provided in the request, and no existing customer with the provided"
        " `customerExternalId` was found.",
    ),
    "dub-lead",
)

SALE = sale.SaleDialect(
    Dialect.DUB,
    SALE_VOICE,
    TrackSale,
    _caller,
    sale.from_refport,
    sale.answer,
    sale.direct_lead,
    lambda: Problem(404, "not_found", "Click event not found for this clickId"),
)


@routes.post("/track/lead")
@documented(
    "Track a lead (Dub's API, at its path): attributed to its click, or (clickId empty) to the customer's"
    " earlier one; mode deferred records the click for a later lead; eventQuantity counts it N times",
    "Dub",
    {200: TrackLeadAnswer, **errors(DubError, 401, 403, 404, 422, 429, 503, *BODY)},
    TrackLead,
    "bearer",
)
async def track_lead(request: web.Request) -> web.Response:
    return await lead.track(request, LEAD)


@routes.post("/track/sale")
@documented(
    "Track a sale (Dub's API, at its path): attributed to the customer's lead; with clickId, tracked"
    " directly (the customer's lead made from the click); an invoice counts once",
    "Dub",
    {200: TrackSaleAnswer, **errors(DubError, 401, 403, 404, 422, 429, 503, *BODY)},
    TrackSale,
    "bearer",
)
async def track_sale(request: web.Request) -> web.Response:
    return await sale.track(request, SALE)


class DubClick(BaseModel):
    """Dub's ``POST /track/click``: the link by its domain and key, and where the click
    happened."""

    model_config = ConfigDict(extra="ignore")
    domain: NoNul = Field(min_length=1, max_length=253, description="The short link's domain")
    key: NoNul = Field(min_length=1, max_length=128, description="The short link's key (refstream's link code)")
    url: NoNul | None = Field(None, max_length=2048, description="The page the click landed on")
    referrer: NoNul | None = Field(None, max_length=2048)


def allowed_host(allowed: tuple[str, ...], request: web.Request) -> bool:
    """Whether the workspace's allowed hostnames admit the page this request came from (its
    ``Origin``, else its ``Referer``). A list entry is an origin
    (``https://shop.example.com``, matched exactly), a hostname (``example.com``, which
    ``www.example.com`` also matches) or a wildcard (``*.example.com``: every subdomain and
    the domain itself). An empty list admits every page; a request that names no page is
    not admitted by a list."""
    if not allowed:
        return True
    source = request.headers.get("Origin") or request.headers.get("Referer")
    try:
        parts = urlsplit(source) if source else None
        host = parts.hostname if parts else None
    except ValueError:
        return False
    if not parts or not host:
        return False
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    bare = host.removeprefix("www.")
    for entry in allowed:
        entry = entry.strip().lower().rstrip("/")
        if "://" in entry:
            if entry == origin:
                return True
        elif entry.startswith("*."):
            if host == entry[2:] or host.endswith(entry[1:]):
                return True
        elif bare == entry.removeprefix("www."):
            return True
    return False


def _clicked(click_id: str) -> web.Response:
    # refstream keeps no partner profile or discount to show: both null, as Dub answers a
    # link that is not a partner's
    body = orjson.dumps({"clickId": click_id, "partner": None, "discount": None})
    return web.Response(body=body, content_type="application/json")


@routes.post("/track/click")
@documented(
    "Track a click from a browser (Dub's API, at its path): the link by domain and key; allowed by the"
    " workspace's allowed hostnames (Origin, else Referer); a browser's repeat within the hour gets its"
    " first clickId",
    "Dub",
    {200: TrackClickAnswer, **errors(DubError, 403, 404, 422, 429, 503, *BODY)},
    DubClick,
    idempotent=True,  # per browser and link
)
@CLICK_VOICE.answers
async def track_click(request: web.Request) -> web.Response:
    """The click, recorded once per browser and link within ``SEEN_CLICK_S``."""
    edge = request.app[EDGE]
    body, problem = await accept.parsed(request, DubClick)
    if problem is not None or body is None:
        edge.drops.note(None, None, "invalid")
        return _problem(problem) if problem is not None else error(400, "Invalid body")
    if not plain(body.key, 128):
        accept.unknown_code(edge, CLICK_VOICE.route, None)  # not fit to show: a drop alone
        return error(404, "Link not found")
    ip = edge.client_ip(request)
    agent = request.headers.get("User-Agent", "")
    identity = hashlib.sha256(f"{ip}\x1f{agent}".encode()).hexdigest()[:32]
    seen_key = edge.keys.seen_click(body.key, identity)
    found = await accept.look(edge, edge.track_click_limiter, ip or "-", body.key, extra=(("GET", seen_key),))
    # a link without partner or program takes clicks here (Dub tracks any link's)
    refused = accept.refusal(edge, CLICK_VOICE.route, body.key, found, None, configured=False)
    link = found.link
    if refused is accept.Refusal.RATE_LIMITED:
        return error(429, "Too many requests", found.verdict.headers)
    if refused is accept.Refusal.UNRESOLVED:
        return CLICK_VOICE.down()
    if refused is not None or link is None or (link.domain and link.domain.lower() != body.domain.lower()):
        if link is not None and refused is None:  # another domain's link: this one is not known
            accept.unknown_code(edge, CLICK_VOICE.route, body.key, link.workspace_id, link.id)
        return error(404, f"Link not found for domain {body.domain!r} and key {body.key!r}")
    if not allowed_host(link.allowed_origins, request):
        return error(403, "The request's origin is not one of the workspace's allowed hostnames")
    held = found.extra[0] if found.extra else None
    if isinstance(held, bytes):  # this browser's click on this link within the hour
        return _clicked(held.decode())
    fields = {}
    if body.referrer:
        fields["referrer"] = body.referrer
    if body.url:
        fields["page_url"] = body.url
    first = await _first(edge, seen_key, claim := edge.keys.seen_click_claim(body.key, identity))
    if first is not None:  # the same browser's request a moment ahead of this one appended it
        return _clicked(first)
    made = accept.click(request, edge, Dialect.DUB, link, link.code, fields, ip=ip)
    named = (("SET", seen_key, made.click_id, "EX", SEEN_CLICK_S), ("DEL", claim))
    if not await enqueue.put(edge, made.envelope, link.code, *made.also, *named, link=link, spool=True):
        await _name_spooled(edge, named)
    return _clicked(made.click_id)


async def _name_spooled(edge: Edge, named: tuple[Command, ...]) -> None:
    """A click the spool took (Redis short of the durability level, or refusing it) names
    itself for its browser in Redis all the same, best effort and unconfirmed: its repeats
    then answer its id while it waits in the spool, whose drain writes the name again. A
    name Redis loses (a failover) or never takes (Redis down) lets a repeat count again."""
    try:
        await edge.batcher.execute(*named)
    except (NotSent, OutcomeUnknown):
        pass


async def _first(edge: Edge, seen_key: str, claim: str) -> str | None:
    """The click id of this browser's click on this link that a request a moment ahead of
    this one appended (two requests of a double click, or a retry that overtook its first),
    or None: this request appends the browser's click. The first to take ``claim``
    (``SET NX``, ``CLAIM_MS``) appends, its round trip naming the click (``seen_key``) and
    letting the claim go; another waits for that name. A claim whose request died (or whose
    click went to the spool with no name Redis took) lapses: the next request appends a
    click of its own. None too when Redis cannot say (the click then goes to the spool, as
    one of its own)."""
    deadline = time.monotonic() + 3 * CLAIM_MS / 1000
    while True:
        try:
            won, held = await edge.batcher.execute(("SET", claim, "1", "NX", "PX", CLAIM_MS), ("GET", seen_key))
        except (NotSent, OutcomeUnknown):
            return None
        if isinstance(held, bytes):
            return held.decode()
        if won is not None or time.monotonic() > deadline:  # taken (an error reply: Redis cannot say)
            return None
        await asyncio.sleep(CLAIM_POLL_S)


# each route as the list of steps it takes, in their order: every step one shared function
# (tests/test_route_steps.py holds each route to its list, and its list to its dialect)
STEPS: dict[str, tuple[Callable[..., Any], ...]] = {
    "track_lead": lead.STEPS,
    "track_sale": sale.STEPS,
    "track_click": (accept.parsed, accept.unknown_code, accept.look, accept.refusal, accept.click, enqueue.put),
}
