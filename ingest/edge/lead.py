"""A lead, the same on every route that takes one by Dub's API: Refport's
``POST /api/track/lead`` and Dub's ``POST /track/lead`` (the same API, field for field).

A lead names the click it follows (``clickId``): any click id refstream minted, found in the
click cache (written when the click was accepted) or, for older clicks, in Postgres. An
empty ``clickId`` is deferred tracking's second half: the click is the one this customer's
earlier lead named (a ``mode: deferred`` lead within ``DEFERRED_TTL_S``, else the customer's
first click in Postgres). A ``deferred`` lead appends nothing: it only remembers its click
for that later lead. ``async`` and ``wait`` are the same here: ``wait`` exists so that a sale
right after its lead finds it, and refstream attributes a sale to its lead whichever the
workers store first. ``eventQuantity`` N makes one event that counts N leads.

A lead is idempotent on (customer external id, event name), in the workers: a second one
is accepted and counts nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ingest.contract import clicks, links
from ingest.contract.clicks import ClickRef
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown
from ingest.contract.events import Envelope, EventType
from ingest.edge import accept, enqueue, keyed
from ingest.edge.bodies import TrackLead
from ingest.edge.idempotency import HEADER, Claim, fingerprint
from ingest.edge.lookup import Found, Guess, remember, seen
from ingest.edge.problem import Down, Problem
from ingest.edge.resolve import Unavailable, anywhere, fallback, pool_of, resolve_click, seen_link
from ingest.edge.state import Edge

# how long a deferred lead's click waits for the lead that completes it, at least (and as
# long as the link's cookie window where that is longer)
DEFERRED_TTL_S = 7 * 86400

# the customer's first click, for a lead that names none (the index customers_external)
_CUSTOMER_CLICK = """
SELECT first_click_id FROM customers
WHERE workspace_id = $1 AND external_id = $2 AND first_click_id IS NOT NULL
ORDER BY last_seen_at DESC LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class LeadDialect:
    """A dialect's lead route, all it says of its own: the envelope's ``dialect``, its
    ``voice``, its keyed ``refusals`` (``accept.Refusals``), its ``answer`` (the echo of
    ``echo``, in its own shape), the refusal of a click it does not know
    (``unknown_click``) and of an empty ``clickId`` with no earlier click
    (``no_click``), and the idempotency record's route name (``claim``)."""

    dialect: str
    voice: accept.Voice
    refusals: accept.Refusals
    answer: Callable[[TrackLead, dict[str, Any]], bytes]
    unknown_click: Callable[[], web.Response]
    no_click: Callable[[], web.Response]
    claim: str


def short_link(request: web.Request, code: str) -> str:
    """The link's URL on this edge, the one that records a click (``GET /r/{code}``)."""
    return f"{request.scheme}://{request.host}/r/{code}"


def link_echo(request: web.Request, link: links.LinkInfo) -> dict[str, Any]:
    """A link as Dub's answers show it: refstream's values, null where it has none (a link
    has no id in the caller's database, ``externalId``, nor a tenant that made it,
    ``tenantId``); ``partnerId`` is the link's affiliate, by refstream's id."""
    return {
        "id": link.id,
        "domain": link.domain or request.host,
        "key": link.code,
        "url": link.url,
        "programId": link.program_id,
        "shortLink": short_link(request, link.code),
        "partnerId": link.affiliate_id,
        "tenantId": None,
        "externalId": None,
    }


def echo(request: web.Request, body: TrackLead, click: ClickRef, link: links.LinkInfo | None) -> dict[str, Any]:
    """What a lead's answer says, in Dub's field names: the click, its link (null when the
    link was deleted after the click: the lead is stored all the same) and the customer."""
    return {
        "click": {"id": click.click_id},
        "link": link_echo(request, link) if link is not None else None,
        "customer": {
            "externalId": body.customerExternalId,
            "email": body.customerEmail,
            "name": body.customerName,
            "avatar": body.customerAvatar,
        },
    }


def envelope(request: web.Request, edge: Edge, dialect: str, body: TrackLead, click: ClickRef) -> Envelope:
    payload: dict[str, Any] = {
        "code": click.code,
        "click_id": click.click_id,
        "visitor_id": click.visitor_id,
        "name": body.eventName,
        "external_id": body.customerExternalId,
    }
    for field, value in (
        ("email", body.customerEmail),
        ("customer_name", body.customerName),
        ("avatar", body.customerAvatar),
        ("metadata", body.metadata),
    ):
        if value is not None:
            payload[field] = value
    if body.quantity > 1:
        payload["quantity"] = body.quantity
    return accept.event(request, edge, EventType.LEAD, dialect, click.workspace_id, payload, ip=edge.client_ip(request))


async def track(request: web.Request, d: LeadDialect) -> web.Response:
    """A dialect's lead route: the key (401), the lookup with the key's rate limit and the
    click (appending at once where what this edge last read says "accept"), the route's
    refusals, the click (the named one, else the customer's earlier one), the link to echo,
    then the append with the ``Idempotency-Key``'s claim; a deferred lead remembers its
    click. What is raised below it is rendered in the dialect's voice."""
    try:
        return await _track(request, d)
    except (Problem, Down) as exc:
        return d.voice.render(exc)


async def _track(request: web.Request, d: LeadDialect) -> web.Response:
    edge, secret = accept.keyed(request)
    if secret is None:
        return d.voice.refuse(401, "unauthorized", "Invalid or missing API key")
    body, problem = await accept.parsed(request, TrackLead)
    click_id = body.clickId if body else None
    reads: tuple[Command, ...] = (("GET", edge.keys.click(click_id)),) if click_id else ()
    made: _Made | None = None
    guess = None
    if body is not None and click_id and body.mode != "deferred" and HEADER not in request.headers:
        made = _guess(request, edge, d, body, secret, click_id)
        if made is not None:
            guess = Guess(made.envelope, made.click.code)
            reads += (("GET", edge.keys.link(made.click.code)),)
    found = await accept.look_keyed(edge, secret, extra=reads, guess=guess)
    admitted = d.refusals(request, edge, found, problem, body)
    assert body is not None
    workspace = admitted.principal.workspace_id
    try:
        click = await _click(edge, workspace, body, found)
    except Unavailable:
        return d.voice.down()
    except (NotSent, OutcomeUnknown) as exc:
        return d.voice.down(exc)
    if click is None and not body.clickId:
        edge.drops.note(workspace, None, "invalid")
        return d.no_click()
    if click is None or click.workspace_id != workspace:
        edge.drops.note(workspace, None, "unknown_code")
        return d.unknown_click()
    headers = found.verdict.headers
    if found.appended:  # what was read held what the guess was made from: it went in
        assert made is not None
        return accept.accepted(made.resp, headers)
    # the link to echo is found before the lead is appended: nothing can fail after a 2xx is due
    try:
        link = await _link(edge, found, made, click)
    except Unavailable:
        return d.voice.down()
    except (NotSent, OutcomeUnknown) as exc:
        return d.voice.down(exc)
    resp = d.answer(body, echo(request, body, click, link))
    if body.mode == "deferred":
        return await _defer(edge, d, body, click, link, resp, headers)
    idem_key = admitted.idem_key
    # keyed: Redis down is a 503 (spool=False)
    event = envelope(request, edge, d.dialect, body, click)
    if idem_key is None:
        await enqueue.put(edge, event, click.code, link=link, spool=False)
        return accept.accepted(resp, headers)
    claim = Claim.of(idem_key, d.claim, workspace, fingerprint(body.model_dump()))
    return await keyed.put_once(edge, d.voice.refuse, claim, event, click.code, resp, headers, link=link, spool=False)


@dataclass(frozen=True, slots=True)
class _Made:
    click: ClickRef
    envelope: Envelope
    resp: bytes


def _guess(
    request: web.Request, edge: Edge, d: LeadDialect, body: TrackLead, secret: str, click_id: str
) -> _Made | None:
    """The lead as it will be if the key, the click and its link read as this edge last read
    them: then it is appended in the lookup's own round trip."""
    _, known_key, _ = edge.auth.cached(secret)
    raw = seen(edge, edge.keys.click(click_id))
    known_click = clicks.decode(click_id, raw) if isinstance(raw, bytes) else None
    if known_key is None or not known_key.allows("track") or known_click is None:
        return None
    known_link = seen_link(edge, known_click.code)
    if known_click.workspace_id != known_key.workspace_id or known_link is None:
        return None
    resp = d.answer(body, echo(request, body, known_click, known_link))
    return _Made(known_click, envelope(request, edge, d.dialect, body, known_click), resp)


async def _click(edge: Edge, workspace: str, body: TrackLead, found: Found) -> ClickRef | None:
    """The click the lead names; for an empty ``clickId``, this customer's earlier one (a
    deferred lead's, else their first click in Postgres); None when there is none."""
    if body.clickId:
        return await resolve_click(edge, body.clickId, found.extra[0])
    (held,) = await edge.batcher.execute(("GET", edge.keys.deferred(workspace, body.customerExternalId)))
    if isinstance(held, bytes):
        click_id = held.decode()
    else:
        first = await fallback(edge, lambda: _first_click(edge, workspace, body.customerExternalId))
        if first is None:
            return None
        click_id = first
    (cached,) = await edge.batcher.execute(("GET", edge.keys.click(click_id)))
    return await resolve_click(edge, click_id, cached)


async def _first_click(edge: Edge, workspace: str, external_id: str) -> str | None:
    async with (await pool_of(edge, workspace)).acquire() as conn:
        first = await conn.fetchval(_CUSTOMER_CLICK, workspace, external_id)
    return clicks.mint(first) if first is not None else None


async def _link(edge: Edge, found: Found, made: _Made | None, click: ClickRef) -> links.LinkInfo | None:
    if len(found.extra) > 1 and made is not None and made.click.code == click.code:
        cached = found.extra[1]  # read with the click, for the guess
    else:
        (cached,) = await edge.batcher.execute(("GET", edge.keys.link(click.code)))
        remember(edge, edge.keys.link(click.code), cached)
    link = links.decode(cached)
    if isinstance(link, links.LinkInfo):
        return link
    code = click.code
    return await fallback(
        edge, lambda: anywhere(edge, lambda pool: links.fetch(pool, code), lambda link: link.workspace_id)
    )


async def _defer(
    edge: Edge,
    d: LeadDialect,
    body: TrackLead,
    click: ClickRef,
    link: links.LinkInfo | None,
    resp: bytes,
    headers: dict[str, str] | None,
) -> web.Response:
    """A deferred lead: its click is remembered for the customer, for the lead that
    completes it (an empty ``clickId``); no event is appended, nothing counts yet. Written
    at the ack durability level, as an event is (``REFSTREAM_ACK_DURABILITY``): a 200 is
    not lost to a failover; short of the level, the route's 503, and a retry writes it
    again (the same value: nothing counts twice)."""
    ttl_s = max(DEFERRED_TTL_S, (link.cookie_window_days if link else 0) * 86400)
    key = edge.keys.deferred(click.workspace_id, body.customerExternalId)
    try:
        (reply,) = await edge.batcher.execute(("SET", key, click.click_id, "EX", ttl_s), durable=True)
    except (NotSent, OutcomeUnknown) as exc:
        return d.voice.down(exc)
    if isinstance(reply, Exception):
        return d.voice.down(reply)
    return accept.accepted(resp, headers)


def refport_answer(body: TrackLead, echoed: dict[str, Any]) -> bytes:
    """Refport's answer: its documented fields (the event name, the click, the link's id,
    domain, key, url and programId, the customer's externalId, email and name) byte for
    byte, and beside them what Dub's SDK models also require of the same answer."""
    return orjson.dumps({"eventName": body.eventName, **echoed})


def dub_answer(body: TrackLead, echoed: dict[str, Any]) -> bytes:
    return orjson.dumps(echoed)


# a lead's steps, in their order (a route's ``STEPS``: tests/test_route_steps.py)
STEPS: tuple[Callable[..., Any], ...] = (
    accept.parsed,
    seen_link,
    accept.event,
    accept.look_keyed,
    resolve_click,
    accept.accepted,
    enqueue.put,
    keyed.put_once,
)
