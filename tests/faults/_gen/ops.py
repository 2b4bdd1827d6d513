"""The client operations, one per route a client of refstream calls, and what their answers
must look like.

Every operation carries a token of its own (``g<seed>-<n>``; a batch item ``…-<n>.<i>``)
where Postgres keeps it: a click's referrer (``https://gen.test/<token>``), a lead's
``customerExternalId``, a conversion's ``referred_session_id`` (the row's visitor id), a
sale's metadata (``{"gen": token}``; its customer is its lead's token, or its own); Dub's
click its ``referrer``, Dub's lead its customer (several leads of one customer told apart by
their event names, ``Unit.name``). So
each row maps back to the one request that asked for it (``TOKEN_SQL``), and each answer is
checked against its own request: the code, customer, click and visitor it echoes, and the
event ids it names, whose rows must carry this request's token.
"""

from __future__ import annotations

import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import parse_qs, urlsplit

from ..._world import BROWSER
from .._load import GOOGLEBOT
from .history import Attempt, History, Op, Unit
from .schedule import OpStep

# an answer the edge marks "may be stored" (the outcome of its append is not known): neither
# an acceptance nor a refusal, and a retry with the same key resolves it; it names the event
MAY_BE_STORED = ("Refstream-Outcome", "unknown")
EVENT_ID = "Refstream-Event-Id"
ITEM_UNKNOWN = "outcome_unknown"  # a batch item's "may be stored"
REPLAYED = "Idempotent-Replayed"
KEPT_HEADERS = ("Retry-After", REPLAYED, MAY_BE_STORED[0], EVENT_ID, "Location")
# refusals a correct edge gives a well-formed request of ours: an outage (503), a keyed
# management write still in flight (409)
EXPECTED_REFUSALS = {503, 409}
REFERRER = "https://gen.test/"
# how careless trackers spell that site: a Postgres-derived domain (schema 26) for some, a
# copy in the row for the rest (an upper-case scheme, a user); each reads back the same
SPELLINGS = (REFERRER, "HTTPS://gen.test/", "https://www.gen.test/", "https://u@gen.test/", "http://gen.test/")
TOKEN_SQL = (  # an event row's token (a sale's: its metadata's ``gen``)
    r"CASE e.type WHEN 2 THEN e.customer_external_id WHEN 3 THEN e.visitor_id"
    r" ELSE substring(e.referrer from '^[A-Za-z]+://(?:u@)?(?:www\.)?gen\.test/(.+)$') END"
)


def referrer(token: str) -> str:
    """The referrer a request of ``token`` sends: one of ``SPELLINGS``, by the token."""
    return SPELLINGS[zlib.crc32(token.encode()) % len(SPELLINGS)] + token


TRACKED = {"success": True, "data": {"tracked": True}}


def agent(token: str, bot: bool = False, long: bool = False) -> str:
    """A click's User-Agent: a browser's (or Googlebot's) of its own, so each stored row's
    text is told apart (``Unit.expect``), and the worker meets a new one with nearly every
    batch (schema 20's dictionary, made outside the batch's transaction, under the faults).
    ``long``: as long as a stored string may be (``REFSTREAM_MAX_STRING_LENGTH``, 2,048),
    of two-byte characters: a text too long for a btree entry of itself."""
    text = f"{GOOGLEBOT if bot else BROWSER} gen/{token}"
    return text + " " + "é" * (2047 - len(text)) if long else text


class Commission(TypedDict):
    sale_bps: int
    sale_flat: int
    lead_flat: int
    lead_currency: str
    duration: str
    hold_days: int


# the program's commission rules, set when the world is made; the checker holds the ledger to them
COMMISSION: Commission = {
    "sale_bps": 1500,
    "sale_flat": 25,
    "lead_flat": 100,
    "lead_currency": "usd",
    "duration": "lifetime",
    "hold_days": 0,
}


@dataclass(frozen=True)
class World:
    """What the run's operations need to know of its workspace (``others``: the other
    workspaces' by tag, ``tenants.py``; ``tag``: this one's)."""

    codes: list[str]
    api_key: str
    program_id: str
    affiliate_id: str
    referrer_id: str | None  # the links' affiliate, as Bricqs' answers name it
    erase_key: str = ""  # a key with the erase scope (which "*" does not grant)
    workspace_id: str = ""
    tag: str = "a"
    others: dict[str, World] = field(default_factory=dict)
    gone: dict[str, str] = field(default_factory=dict)  # workspaces made and deleted in the run: id -> tag
    expired_key: str = ""  # a track key made at setup to expire a second later (``careless.py``)
    dub_link: str = ""  # the code of the one link with a domain (``DUB_DOMAIN``): Dub's clicks must name it
    rc_program: str = ""  # the program whose rules change during the run, and its link (``cases.py``)
    rc_code: str = ""
    id_affiliate: str = ""  # the affiliate erased by identity, and their link (``cases.py``)
    id_code: str = ""

    def tenant(self, tag: str) -> World:
        return self if tag == self.tag else self.others[tag]

    def spaces(self) -> dict[str, str]:
        """Workspace id -> tag, for every workspace of the run."""
        return {self.workspace_id: self.tag, **{w.workspace_id: t for t, w in self.others.items()}, **self.gone}

    def url(self, code: str) -> str:
        return f"https://shop.test/{code}"


def _hex(value: Any, prefix: str = "") -> str | None:
    """The event id (32 hex digits) in a click id, conversion id or UUID string."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    try:
        return uuid.UUID(value[len(prefix) :]).hex
    except ValueError:
        return None


def click_id_of(op: Op) -> str | None:
    """The click id an accepted click operation was answered (for a lead on it)."""
    for a in op.attempts:
        if a.outcome != "ok":
            continue
        if op.kind == "affitor" and isinstance(a.body, dict):
            return str(a.body.get("click_id"))
        if op.kind == "dub-click" and isinstance(a.body, dict):
            return str(a.body.get("clickId"))
        if op.kind == "redirect":
            return _redirect_click(a.body)
    return None


def _redirect_click(location: Any) -> str | None:
    if not isinstance(location, str):
        return None
    values = parse_qs(urlsplit(location).query).get("refstream_click_id")
    return values[0] if values else None


def make(step: OpStep, world: World, history: History) -> Op:
    """The request of ``step`` (a lead's click id and stats' participant are read from the
    operations they name, which must be done)."""
    from . import careless, cases, tenants  # they build on this module's shapes

    if tenants.TENANTS_FROM <= step.n < careless.CARELESS_FROM:
        return tenants.make(step, world, history)
    if careless.CARELESS_FROM <= step.n < DUB_FROM:
        return careless.make(step, world, history)
    if step.n >= cases.CASES_FROM:
        return cases.make(step, world, history)
    token = f"g{history.seed}-{step.n}"
    key = f"k-{token}" if step.keyed else None
    if step.kind.startswith("dub-"):
        return _dub(step, token, key, world, history)
    code = world.codes[step.code % len(world.codes)]
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    idem = {"Idempotency-Key": key} if key else {}
    ref = referrer(token)

    def op(method: str, path: str, headers: dict[str, str], body: Any, units: list[Unit], **echo: Any) -> Op:
        # a sale's invoice is its key when it has none: every 2xx of it is the first's answer
        once = key or (f"invoice:{echo['invoice']}" if echo.get("invoice") else None)
        return Op(step.n, step.kind, token, once, method, path, headers, body, units, echo)

    if step.kind == "biore":
        ua = agent(token, bot="bot" in step.flags)
        return op(
            "POST",
            f"/api/v1/referral/click/{code}",
            {"Referer": ref, "User-Agent": ua, **idem},
            None,
            [Unit(token, "click", code, bool(key), {"user_agent": ua})],
        )
    if step.kind == "affitor":
        body: dict[str, Any] = {"affiliate_url": f"https://shop.test/landing?aff={code}", "referrer_url": ref}
        if "test_mode" in step.flags:
            body["additional_data"] = {"test_mode": True}
        headers = {"User-Agent": agent(token)}
        if key and "dedupe_body" in step.flags:
            body["dedupe"] = key
        else:
            headers.update(idem)
        unit = Unit(token, "click", code, bool(key), {"user_agent": headers["User-Agent"]})
        return op("POST", "/api/v1/track/click", headers, body, [unit], partner_code=code)
    if step.kind == "affixo" and "listed" in step.flags:  # a visitor on the do-not-track list
        listing = history.op(step.on) if step.on is not None else None
        assert listing is not None and listing.kind == "suppress"
        visitor = listing.echo["visitor"]
        body = {"ref": code, "referrer": ref, "visitor_id": visitor}
        unit = Unit(token, "click", code, False, {"visitor_id": visitor}, listed_by=listing.n)
        return op("POST", "/v1/track/click", {**bearer, "User-Agent": BROWSER}, body, [unit], visitor_id=visitor)
    if step.kind == "suppress":
        visitor = f"v-listed-{token}"
        return op("POST", "/v1/suppressions", bearer, {"kind": "visitor", "value": visitor}, [], visitor=visitor)
    if step.kind == "affixo":
        body = {"ref": code, "referrer": ref}
        expect = {"user_agent": agent(token)}
        if "fingerprint" in step.flags:
            body["fingerprint"] = f"fp-{token}"
        else:
            body["visitor_id"] = expect["visitor_id"] = f"v-{token}"
        return op(
            "POST",
            "/v1/track/click",
            {**bearer, **idem, "User-Agent": expect["user_agent"]},
            body,
            [Unit(token, "click", code, bool(key), expect)],
            **{k: v for k, v in expect.items() if k != "user_agent"},
        )
    if step.kind == "redirect":
        ua = agent(token)
        unit = Unit(token, "click", code, False, {"user_agent": ua})
        return op("GET", f"/r/{code}", {"Referer": ref, "User-Agent": ua}, None, [unit])
    if step.kind == "convert":
        body = {"code": code, "referred_session_id": token}
        return op("POST", "/api/v1/referrals/convert", {}, body, [Unit(token, "conversion", code, True)])
    if step.kind == "validate":
        return op("GET", f"/api/v1/referrals/validate/{code}", {}, None, [], code=code)
    if step.kind == "generate":
        body = {"participant_id": token, "campaign_id": world.program_id}
        return op(
            "POST", "/api/v1/referrals/generate", {"X-API-Key": world.api_key, **idem}, body, [], participant_id=token
        )
    if step.kind == "link":  # the management API: a link whose code is the token
        body = {"affiliate_id": world.affiliate_id, "code": token, "url": world.url(token)}
        return op("POST", "/v1/links", {**bearer, **idem}, body, [], code=token, url=world.url(token))
    on = history.op(step.on) if step.on is not None else None
    if step.kind == "stats":
        assert on is not None
        code_of = next(
            (a.body.get("code") for a in on.attempts if a.outcome == "ok" and isinstance(a.body, dict)), None
        )
        out = op(
            "GET",
            f"/api/v1/referrals/stats/{on.token}",
            {"X-API-Key": world.api_key},
            None,
            [],
            participant_id=on.token,
            referral_code=code_of,
        )
        out.skipped = None if code_of else f"its participant (op {on.n}) was never generated"
        return out
    if step.kind == "refund":
        return _refund(step, token, on, bearer)
    if step.kind == "import":
        return _import(step, token, world)
    if step.kind == "erase":  # the lead's customer, everywhere (docs/privacy.md)
        assert on is not None and on.kind == "lead"
        eraser = {"Authorization": f"Bearer {world.erase_key}"}
        echo = {"customer": on.token, "lead": on.n}
        return Op(step.n, "erase", token, None, "DELETE", f"/v1/customers/{on.token}", eraser, None, [], echo)
    customer = on.token if on is not None and on.kind == "lead" else None  # a sale's
    if step.kind == "sale":
        return _sale(step, token, customer or f"c-{token}", {**bearer, **idem}, bool(key), op)
    click = click_id_of(on) if on is not None else None
    lead_code = on.units[0].code if on is not None and on.units else None
    lead_expect = {"click_id": _hex(click, "clk_")} if click else {}
    if step.kind == "lead":
        body = {"clickId": click, "eventName": "Sign Up", "customerExternalId": token}
        unit = Unit(token, "lead", lead_code, True, lead_expect)
        out = op("POST", "/api/track/lead", {**bearer, **idem}, body, [unit], click=click, code=lead_code)
        out.skipped = None if click else f"its click (op {step.on}) was never accepted"
        return out
    assert step.kind == "batch", step.kind
    items: list[dict[str, Any]] = []
    units: list[Unit] = []
    for i, kind in enumerate(step.items):
        if kind == "lead" and not click:
            continue
        t = f"{token}.{len(items)}"
        c = world.codes[(step.code + i) % len(world.codes)]
        if kind == "click":
            item: dict[str, Any] = {
                "type": "click",
                "ref": c,
                "visitor_id": f"v-{t}",
                "referrer": referrer(t),
                "ip": f"203.0.113.{step.n % 250 + 1}",
                "user_agent": agent(t, long=step.n % 4 == 0),
            }
            expect = {"visitor_id": f"v-{t}", "user_agent": item["user_agent"]}
            unit = Unit(t, "click", c, bool(key) or "item_keys" in step.flags, expect)
        elif kind == "conversion":
            item = {"type": "conversion", "code": c, "referred_session_id": t}
            unit = Unit(t, "conversion", c, True)
        elif kind == "sale":
            item = {"type": "sale", **_refport_sale(step, t, customer or f"c-{t}")}
            unit = Unit(t, "sale", None, bool(key) or "item_keys" in step.flags or "invoiceId" in item)
        else:
            item = {"type": "lead", "clickId": click, "eventName": "Sign Up", "customerExternalId": t}
            unit = Unit(t, "lead", lead_code, True, dict(lead_expect))
        if "item_keys" in step.flags:
            item["idempotency_key"] = f"ik-{t}"
        items.append(item)
        units.append(unit)
    out = op("POST", "/v1/events/batch", {**bearer, **idem}, items, units)
    # only leads, on a click never accepted: an empty batch, which the route rightly refuses
    out.skipped = None if items else f"its items' click (op {step.on}) was never accepted"
    return out


def _refport_sale(step: OpStep, token: str, customer: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customerExternalId": customer,
        "amount": 100 + step.code % 10_000,
        "currency": ("usd", "EUR")[step.code % 2],
        "paymentProcessor": "stripe",
        "metadata": {"gen": token},
    }
    if "invoice" in step.flags:
        body["invoiceId"] = f"inv-{token}"
    return body


def _sale(step: OpStep, token: str, customer: str, headers: dict[str, str], keyed: bool, op: Any) -> Op:
    """A sale through Refport's route or Affixo's: found by its token (metadata), counted
    once when it has a key or an invoice; attributed by the workers, not checked here."""
    body = _refport_sale(step, token, customer)
    invoice = body.get("invoiceId")
    unit = Unit(token, "sale", None, keyed or invoice is not None)
    echo = {"customer": customer, "amount": body["amount"], "invoice": invoice}
    if "affixo" in step.flags:
        affixo = {
            "customer_id": customer,
            "amount": body["amount"],
            "currency": body["currency"],
            "metadata": body["metadata"],
            **({"invoice_id": invoice} if invoice else {}),
        }
        out: Op = op("POST", "/v1/track/conversion", headers, affixo, [unit], route="affixo", **echo)
        return out
    out = op("POST", "/api/track/sale", headers, body, [unit], route="refport", **echo)
    return out


def _refund(step: OpStep, token: str, sale: Op | None, bearer: dict[str, str]) -> Op:
    """A refund of a sale's invoice by ``refundId`` (its key): a third of it, or all of it
    (no amount). Recorded in Postgres at once; a sale not stored yet is a 404."""
    assert sale is not None and sale.echo.get("invoice")
    body: dict[str, Any] = {"invoiceId": sale.echo["invoice"], "refundId": f"rf-{token}"}
    if "partial" in step.flags:
        body["amount"] = max(1, sale.echo["amount"] // 3)
    echo = {"invoice": sale.echo["invoice"], "amount": body.get("amount", sale.echo["amount"])}
    out = Op(step.n, "refund", token, f"refund:rf-{token}", "POST", "/api/track/refund", bearer, body, [], echo)
    if not any(a.outcome == "ok" for a in sale.attempts):
        out.skipped = f"its sale (op {sale.n}) was never accepted"
    return out


IMPORT_SOURCE = "gen"


def _import(step: OpStep, token: str, world: World) -> Op:
    """``refstream import`` of a file of four rows two days back: two clicks, a lead naming
    the first, a sale of the lead's customer (by invoice). Each row's event id derives from
    its source id (``workers.ops.imports.event_id``): the units' answers name them."""
    from workers.ops.imports import event_id

    now_ms = int(time.time() * 1000) - 2 * 86_400_000
    t = [f"{token}.{i}" for i in range(4)]
    codes = [world.codes[(step.code + i) % len(world.codes)] for i in range(2)]
    rows: list[dict[str, Any]] = [
        {
            "type": "click",
            "id": t[0],
            "timestamp": now_ms,
            "link": codes[0],
            "referrer": referrer(t[0]),
            "ip": f"198.51.100.{step.n % 250 + 1}",
            "user_agent": BROWSER,
        },
        {"type": "click", "id": t[1], "timestamp": now_ms + 1000, "link": codes[1], "referrer": referrer(t[1])},
        {"type": "lead", "id": t[2], "timestamp": now_ms + 60_000, "click": t[0], "customer_id": t[2]},
        {
            "type": "sale",
            "id": t[3],
            "timestamp": now_ms + 120_000,
            "customer_id": t[2],
            "amount": 1000 + step.code,
            "currency": "usd",
            "invoice_id": f"inv-{t[3]}",
            "metadata": {"gen": t[3]},
        },
    ]
    ids = [event_id(world.workspace_id, IMPORT_SOURCE, r["type"], r["id"], r["timestamp"]).hex for r in rows]
    units = [
        Unit(t[0], "click", codes[0], True),
        Unit(t[1], "click", codes[1], True),
        Unit(t[2], "lead", codes[0], True, {"click_id": ids[0]}),
        Unit(t[3], "sale", None, True),
    ]
    return Op(step.n, "import", token, None, "IMPORT", "refstream import", {}, rows, units, {"ids": ids})


# -- Dub's dialect: POST /track/click, /track/lead, /track/sale (schedule._dub, careless.py) --

DUB_FROM = 800_000  # the Dub stream's operations (schedule._dub); careless ones: careless.DUB_FROM
DUB_DOMAIN = "go.gen.test"  # the domain of World.dub_link; every other link's is its URL's host:
SHOP_DOMAIN = "shop.test"  # World.url's
B_ORIGINS = ("*.b-shop.test", "https://pay.b.test")  # workspace b's allowed_origins (cluster.py)
DIRECT_LEAD = "Direct sale tracking lead event"  # Dub's name for a direct sale's lead
# Dub's error code for each status (its documented list: dub.co/docs/api-reference/errors)
DUB_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    422: "unprocessable_entity",
    429: "rate_limit_exceeded",
}


def suffix(tag: str) -> str:
    """What a row of workspace ``tag`` adds to its token (``tenants.suffix``)."""
    return "" if tag == "a" else f"@{tag}"


def dub_click(
    n: int,
    token: str,
    world: World,
    code: str,
    *,
    tag: str = "a",
    ua: str | None = None,
    domain: str = SHOP_DOMAIN,
    page: bool = False,
    headers: dict[str, str] | None = None,
    **echo: Any,
) -> Op:
    """``POST /track/click`` from a browser (its User-Agent its own, or ``ua``: another
    operation's browser again): the link by ``domain`` and key, the page's referrer the
    token's. ``echo["repeat_of"]``: the same browser's click on the same link, answered its id."""
    agent_text = ua or agent(token)
    body: dict[str, Any] = {"domain": domain, "key": code, "referrer": referrer(token)}
    if page:
        body["url"] = world.tenant(tag).url(code)
    unit = Unit(token + suffix(tag), "click", code, False, {"user_agent": agent_text})
    sent = {"User-Agent": agent_text, **(headers or {})}
    return Op(n, "dub-click", token, None, "POST", "/track/click", sent, body, [unit], echo)


def dub_lead(
    n: int,
    token: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    customer: str,
    click: str | None,
    code: str | None,
    key: str | None = None,
    tag: str = "a",
    never: str = "",
    **echo: Any,
) -> Op:
    """``POST /track/lead``: one lead of ``customer`` named ``body["eventName"]`` on ``click``
    (the click it names, or the one an empty ``clickId`` must resolve to), counting its
    ``eventQuantity``; ``never``: the anomaly a row of it is (a deferred lead stores none)."""
    quantity = body.get("eventQuantity") or 1
    expect = {"click_id": _hex(click, "clk_"), "quantity": str(quantity)}
    unit = Unit(customer + suffix(tag), "lead", code, True, expect, name=body["eventName"], never=never)
    echo = {"click": click, "code": code, "customer": customer, "email": body.get("customerEmail"), **echo}
    return Op(n, "dub-lead", token, key, "POST", "/track/lead", headers, body, [unit], echo)


def dub_sale(
    n: int,
    token: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    customer: str,
    key: str | None = None,
    tag: str = "a",
    click_code: str | None = None,
    known: bool = False,
    **echo: Any,
) -> Op:
    """``POST /track/sale``, found by its token (metadata); with a ``clickId`` (direct sale
    tracking) also the customer's lead from that click (``leadEventName``, else Dub's name),
    made when the customer has no row yet: a new customer's is stored once, and attributes
    the sale to the click's link; a ``known`` customer's may be, if the lead that made them
    was not stored yet."""
    invoice = body.get("invoiceId")
    units = [Unit(token + suffix(tag), "sale", None, key is not None or invoice is not None)]
    click = body.get("clickId")
    if click:
        lead = body.get("leadEventName") or DIRECT_LEAD
        expect = {"click_id": _hex(click, "clk_"), "quantity": "1"}
        units.append(Unit(customer + suffix(tag), "lead", click_code, True, expect, name=lead, maybe=known))
    echo = {
        "customer": customer,
        "amount": body["amount"],
        "currency": body.get("currency", "usd").lower(),
        "invoice": invoice,
        "name": body.get("customerName"),
        "email": body.get("customerEmail"),
        **({"attributed": click_code} if click and not known else {}),
        **echo,
    }
    once = key or (f"invoice:{invoice}" if invoice else None)
    return Op(n, "dub-sale", token, once, "POST", "/track/sale", headers, body, units, echo)


def _dub(step: OpStep, token: str, key: str | None, world: World, history: History) -> Op:
    """The Dub stream's operations (``schedule._dub``): clicks (some again from the same
    browser, some on the link with a domain, some with an ``Origin``), leads on them (a mode,
    a quantity, an email; or a later one of the same customer with an empty ``clickId``,
    whose click is found in Postgres), sales (direct, naming a click; on a lead's customer;
    or a customer of their own)."""
    on = history.op(step.on) if step.on is not None else None
    bearer = {"Authorization": f"Bearer {world.api_key}", **({"Idempotency-Key": key} if key else {})}
    if step.kind == "dub-click" and "repeat" in step.flags:
        assert on is not None and on.kind == "dub-click"
        code = on.units[0].code
        assert code is not None
        ua, domain = on.headers["User-Agent"], on.body["domain"]
        return dub_click(step.n, token, world, code, ua=ua, domain=domain, repeat_of=on.n)
    if step.kind == "dub-click":
        on_domain = "domain" in step.flags and bool(world.dub_link)
        code = world.dub_link if on_domain else world.codes[step.code % len(world.codes)]
        domain = DUB_DOMAIN if on_domain else SHOP_DOMAIN
        domain = domain.upper() if step.code % 3 == 0 else domain  # a host name's case is no matter
        origin = {"Origin": "https://shop.test"} if "origin" in step.flags else {}
        return dub_click(step.n, token, world, code, domain=domain, page="page" in step.flags, headers=origin)
    assert on is not None or step.kind == "dub-sale"
    if step.kind == "dub-lead" and "follow" in step.flags:  # a later lead of a customer: no clickId
        assert on is not None
        follow: dict[str, Any] = {"clickId": "", "eventName": "Upgrade", "customerExternalId": on.token}
        # its click is the customer's first, once the workers stored the earlier lead: until
        # then (or if that lead was never stored) there is none to go on, a 400
        out = dub_lead(
            step.n, token, follow, bearer, key=key, customer=on.token, click=on.echo["click"], code=on.echo["code"]
        )
        out.echo["allow"] = [400]
        out.skipped = None if on.skipped is None else f"its lead (op {on.n}) was never sent"
        return out
    if step.kind == "dub-lead":
        assert on is not None
        click = click_id_of(on)
        body: dict[str, Any] = {"clickId": click, "eventName": "Sign Up", "customerExternalId": token}
        for flag in step.flags:
            if flag in ("async", "wait"):
                body["mode"] = flag
            elif flag.startswith("qty:"):
                body["eventQuantity"] = int(flag[4:])
        if "email" in step.flags:
            body["customerEmail"] = f"{token}@dub.test"
        out = dub_lead(step.n, token, body, bearer, key=key, customer=token, click=click, code=on.units[0].code)
        out.skipped = None if click else f"its click (op {on.n}) was never accepted"
        return out
    assert step.kind == "dub-sale", step.kind
    customer, click, click_code = f"c-{token}", None, None
    if "direct" in step.flags and on is not None:  # a new customer's sale, naming their click
        click, click_code = click_id_of(on), on.units[0].code
    elif "known-direct" in step.flags and on is not None:  # naming the click of a customer's lead
        customer, click, click_code = on.token, on.echo["click"], on.echo["code"]
    elif on is not None:  # a lead's customer's
        customer = on.token
    body = {
        "customerExternalId": customer,
        "amount": 100 + step.code % 10_000,
        "currency": ("usd", "EUR")[step.code % 2],
        "paymentProcessor": "stripe",
        "metadata": {"gen": token},
    }
    if "invoice" in step.flags:
        body["invoiceId"] = f"inv-{token}"
    if click:
        body["clickId"] = click
    if "lead-name" in step.flags:
        body["leadEventName"] = "Checkout"
    if "named" in step.flags:
        body["customerName"] = f"Customer {step.code}"
    known = "known-direct" in step.flags
    out = dub_sale(step.n, token, body, bearer, customer=customer, key=key, click_code=click_code, known=known)
    if ("direct" in step.flags or "known-direct" in step.flags) and not click:
        out.skipped = f"its click (op {step.on}) was never accepted"
    return out


def dub_error_problem(status: int, body: Any) -> str | None:
    """What in a 4xx of Dub's routes is not Dub's error shape ``{"error": {"code", "message",
    "doc_url"}}`` with the status's code."""
    error = body.get("error") if isinstance(body, dict) else None
    want = DUB_CODES.get(status, "bad_request")
    if (
        not isinstance(error, dict)
        or set(body) != {"error"}
        or set(error) != {"code", "message", "doc_url"}
        or error["code"] != want
        or not error["message"]
        or not str(error["doc_url"]).endswith("#" + want.replace("_", "-"))
    ):
        return f"a {status} not in Dub's shape (code {want}): {str(body)[:200]}"
    return None


def classify(op: Op, attempt: Attempt) -> None:
    """Set the attempt's outcome (and each batch item's) from its answer."""
    status, headers = attempt.status, attempt.headers
    if status is None:
        attempt.outcome = "unknown"
    elif headers.get(MAY_BE_STORED[0], "").lower() == MAY_BE_STORED[1]:
        attempt.outcome = "unknown"
    elif op.kind == "redirect" and status == 302:
        attempt.outcome = "ok" if _redirect_click(attempt.body) else "refused"
    elif 200 <= status < 300:
        attempt.outcome = "ok"
    elif 400 <= status < 500 or (status == 503 and "Retry-After" in headers):
        attempt.outcome = "refused"
    else:
        attempt.outcome = "error"  # a 5xx the README does not document (a 503 without Retry-After too)
    if op.kind == "batch":
        results = attempt.body.get("results") if attempt.outcome == "ok" and isinstance(attempt.body, dict) else None
        if isinstance(results, list) and len(results) == len(op.units):
            attempt.items = [_item(r) for r in results]
        else:
            item = "unknown" if attempt.outcome in ("unknown", "error", "ok") else "refused"
            attempt.items = [item] * len(op.units)


def _item(result: Any) -> str:
    if not isinstance(result, dict):
        return "refused"
    return "ok" if result.get("ok") else "unknown" if result.get("error") == ITEM_UNKNOWN else "refused"


def retryable(attempt: Attempt) -> bool:
    """What a real client retries: no answer, a 5xx, a 409 (in flight) or a 429."""
    return attempt.status is None or attempt.status >= 500 or attempt.status in (409, 429)


def named_events(op: Op, attempt: Attempt) -> dict[int, str]:
    """Unit index -> the event id (hex) an answer names for it: an accepted one's, or the
    event a "may be stored" answer may have stored."""
    body = attempt.body
    if attempt.outcome == "unknown":
        maybe = _hex(attempt.headers.get(EVENT_ID))
        if op.kind == "dub-sale" and len(op.units) > 1:  # the sale's, or its direct lead's: either
            return {}
        return {0: maybe} if maybe and op.units else {}
    if op.kind == "dub-click" and isinstance(body, dict):
        found = _hex(body.get("clickId"), "clk_")
        return {0: found} if found else {}
    if op.kind == "affitor" and isinstance(body, dict):
        found = _hex(body.get("click_id"), "clk_") or _hex((body.get("data") or {}).get("eventId"))
        return {0: found} if found else {}
    if op.kind == "convert" and isinstance(body, dict):
        found = _hex(body.get("conversion_id"), "conv_")
        return {0: found} if found else {}
    if op.kind == "sale" and isinstance(body, dict):  # Affixo's names it; Refport's, as Dub's, does not
        found = _hex(body.get("conversion_id"))
        return {0: found} if found else {}
    if op.kind == "redirect":
        found = _hex(_redirect_click(body), "clk_")
        return {0: found} if found else {}
    if op.kind == "import" and attempt.outcome == "ok":  # its ids derive from the rows' source ids
        return dict(enumerate(op.echo["ids"]))
    if op.kind == "batch" and isinstance(body, dict):
        return {
            i: h
            for i, r in enumerate(body.get("results") or [])
            if isinstance(r, dict) and r.get("ok") and (h := _hex(r.get("event_id")))
        }
    return {}


def answer_problems(op: Op, attempt: Attempt, world: World) -> list[str]:
    """What in an accepted answer is not this request's: each a sentence."""
    b, e = attempt.body, op.echo
    if op.kind == "t-workspace":  # an operator's commands: judged by what they leave (walls.py)
        return []
    if op.kind == "redirect":
        return [] if isinstance(b, str) and b.startswith(world.url(op.units[0].code or "")) else [f"Location {b!r}"]
    if not isinstance(b, dict):
        return [f"not a JSON object: {b!r}"[:200]]
    want: dict[str, Any] = {}
    if op.kind == "biore":
        return [] if b == TRACKED else [f"{b!r}, not {TRACKED!r}"]
    if op.kind == "affitor" and "data" not in b:
        want = {"success": True, "partner_code": e["partner_code"]}
        if _hex(b.get("click_id"), "clk_") is None:
            want["click_id"] = "clk_<32 hex>"
    elif op.kind == "affixo" and "placeholder" in e:  # no one's id: a visitor of its own
        if b.get("visitor_id") == e["placeholder"]:
            return [f"visitor {e['placeholder']!r} taken as an id"]
        want = {"ok": True, "match_method": "new"}
    elif op.kind == "affixo":
        want = {"ok": True, **({"visitor_id": e["visitor_id"], "match_method": "cookie"} if "visitor_id" in e else {})}
    elif op.kind == "lead":
        got = {
            "eventName": b.get("eventName"),
            "click": (b.get("click") or {}).get("id"),
            "customer": (b.get("customer") or {}).get("externalId"),
            "link": (b.get("link") or {}).get("key"),
        }
        wanted = {"eventName": "Sign Up", "click": e["click"], "customer": op.token, "link": e["code"]}
        return [f"{k}: {got[k]!r}, not {v!r}" for k, v in wanted.items() if got[k] != v]
    elif op.kind == "dub-click":
        shape = {"clickId": b.get("clickId"), "partner": None, "discount": None}
        if b != shape or _hex(b.get("clickId"), "clk_") is None:
            return [f"{b!r}, not {{'clickId': 'clk_<32 hex>', 'partner': None, 'discount': None}}"[:300]]
        return []
    elif op.kind == "dub-lead":  # Dub's answer: the click, its link and the customer, no eventName
        customer = b.get("customer") or {}
        got = {
            "fields": sorted(b),
            "click": (b.get("click") or {}).get("id"),
            "customer": customer.get("externalId"),
            "email": customer.get("email"),
            "link": (b.get("link") or {}).get("key"),
        }
        wanted = {
            "fields": ["click", "customer", "link"],
            "click": e["click"],
            "customer": e["customer"],
            "email": e["email"],
            "link": e["code"],
        }
        return [f"{k}: {got[k]!r}, not {v!r}" for k, v in wanted.items() if got[k] != v]
    elif op.kind == "dub-sale":
        sale = b.get("sale") or {}
        got = {
            "eventName": b.get("eventName"),
            "customer": b.get("customer"),
            "amount": sale.get("amount"),
            "currency": sale.get("currency"),
            "invoice": sale.get("invoiceId"),
            "metadata": sale.get("metadata"),
        }
        c = e["customer"]
        wanted = {
            "eventName": "Purchase",
            # (refstream names a customer by their external id: the id is it, ingest/edge/dub_shapes.py)
            "customer": {"id": c, "externalId": c, "name": e["name"], "email": e["email"], "avatar": None},
            "amount": e["amount"],
            "currency": e["currency"],
            "invoice": e["invoice"],
            "metadata": op.body.get("metadata"),
        }
        return [f"{k}: {got[k]!r}, not {v!r}" for k, v in wanted.items() if got[k] != v]
    elif op.kind == "convert":
        want = {"converted": True, "referrer_id": world.referrer_id}
    elif op.kind == "refund":
        want = {"invoice_id": e["invoice"], "amount": e["amount"]}
    elif op.kind == "suppress":
        return [] if b.get("kind") == "visitor" and isinstance(b.get("id"), str) else [f"{b!r}"[:200]]
    elif op.kind == "import":
        counts = (b.get("read"), b.get("stored", 0) + b.get("duplicates", 0), b.get("refused_total"))
        rows, refused = len(op.body), op.echo.get("refused_rows", 0)
        expected = (rows, rows - refused, refused)
        return [] if counts == expected else [f"read, stored or known, refused: {counts}, not {expected}"]
    elif op.kind == "erase":
        return [] if isinstance(b.get("erasure_id"), str) and b.get("status") in ("pending", "done") else [f"{b!r}"]
    elif op.kind == "sale" and e["route"] == "affixo":
        want = {"ok": True, "customer_id": e["customer"], "amount": e["amount"], "invoice_id": e["invoice"]}
    elif op.kind == "sale":
        sale = b.get("sale") or {}
        got = {
            "customer": (b.get("customer") or {}).get("externalId"),
            "amount": sale.get("amount"),
            "invoice": sale.get("invoiceId"),
        }
        return [f"{k}: {got[k]!r}, not {e[k]!r}" for k in got if got[k] != e[k]]
    elif op.kind in ("generate", "stats", "validate", "link"):
        want = dict(e)
        if op.kind == "validate":
            want.update(valid=True, referrer_id=world.referrer_id)
    elif op.kind == "batch":
        results = b.get("results")
        if not isinstance(results, list) or len(results) != len(op.units):
            return [f"{len(results) if isinstance(results, list) else '?'} results for {len(op.units)} items"]
        problems = []
        for i, r in enumerate(results):
            item = op.body[i]
            if r.get("index") != i:
                problems.append(f"result {i} has index {r.get('index')}")
            sent = item.get("visitor_id")  # none sent (a placeholder fingerprint): one of its own
            if r.get("ok") and item["type"] == "click" and sent is not None and r.get("visitor_id") != sent:
                problems.append(f"item {i}: visitor {r.get('visitor_id')!r}, not {sent!r}")
        return problems
    return [f"{k}: {b.get(k)!r}, not {v!r}" for k, v in want.items() if b.get(k) != v]
