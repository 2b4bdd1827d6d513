"""What careless clients send, beside the well-formed traffic: sales whose metadata nests at
the JSON bound and one level past it (``deep``), through Refport's route, Affixo's and the
batch route; clicks of the visitor ``"undefined"`` in two workspaces at once (``shared``:
a placeholder is no one's id, so each is answered a visitor of its own, ``new``);
a customer id sent with a no-break space and a zero-width space around it, and erased a
moment later by another spelling of it, percent-encoded in the path (``odd``): whatever a
route accepted, the API erases (``ingest/contract/ids.py``); a CSV file as a spreadsheet
writes it, with a byte-order mark, times in seconds and a row with a broken quote
(``csv``): the broken row refused by its line, the others stored once; a click sent with a
key that expired at setup, a second after it was made (``expired``): refused with a 401,
never stored, an answer 2xx being ``expired_key_accepted``.

At the bound a request is a sale like any other: stored once (it has an invoice). Past it,
it is refused with a 400 in its route's own shape, and never stored: the checker counts any
other answer as ``bound_not_enforced`` (a 2xx) or ``5xx``, and a stored row as
``refusal_counted`` (``checker.py``).
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from ..._world import BROWSER
from .history import History, Op, Unit
from .ops import World, click_id_of, referrer
from .tenants import UNDEFINED, suffix

CARELESS_FROM = 700_000
EVERY_S = (1.0, 3.0)
DEEP_ROUTES = ("refport", "affixo", "batch")


def draw(rng: random.Random, load_s: float) -> list[Any]:
    from .schedule import OpStep

    out: list[OpStep] = []
    t = rng.uniform(*EVERY_S)
    while t < load_s:
        roll = rng.random()
        if roll < 0.45:
            flags = {"deep", rng.choice(DEEP_ROUTES), rng.choice(("at", "past"))}
        elif roll < 0.75:
            flags = {"shared", f"ws:{rng.choice('ab')}"}
        elif roll < 0.9:
            flags = {"odd"}
        elif roll < 0.95:
            flags = {"csv"}
        else:
            flags = {"expired"}
        out.append(OpStep(CARELESS_FROM + len(out), t, "careless", False, rng.randrange(1 << 16), frozenset(flags)))
        if "odd" in flags and t + 3.0 < load_s:
            on = out[-1].n
            out.append(
                OpStep(
                    CARELESS_FROM + len(out),
                    t + rng.uniform(2.0, 3.0),
                    "careless",
                    False,
                    rng.randrange(1 << 16),
                    frozenset({"odd-erase"}),
                    (),
                    on,
                )
            )
        t += rng.uniform(*EVERY_S)
    return out


def depth_bound() -> int:
    """The JSON depth every door takes (the body itself is level 1)."""
    from ingest.contract.bounds import MAX_DEPTH

    return MAX_DEPTH


def nested(levels: int, leaf: Any) -> Any:
    """``leaf`` inside ``levels`` arrays."""
    for _ in range(levels):
        leaf = [leaf]
    return leaf


ODD = "\u00a0{}\u200b"  # a no-break space before, a zero-width space after: what a copy and paste brings
ODD_PATH = "%E2%80%8B{}%C2%A0"  # the other way round, percent-encoded


def make(step: Any, world: World, history: History) -> Op:
    token = f"g{history.seed}-{step.n}"
    if "dub" in step.flags:
        return _dub(step, token, world, history)
    if "odd-erase" in step.flags:
        sale = history.op(step.on)
        assert sale is not None
        customer = sale.echo["customer"]
        eraser = {"Authorization": f"Bearer {world.erase_key}"}
        echo: dict[str, Any] = {"customer": customer, "lead": sale.n}
        return Op(
            step.n, "erase", token, None, "DELETE", "/v1/customers/" + ODD_PATH.format(customer), eraser, None, [], echo
        )
    if "odd" in step.flags:  # a conversion through Affixo's route, its answer naming its event
        customer = f"c-{token}"
        invoice = f"inv-{token}"
        body: Any = {
            "customer_id": ODD.format(customer),
            "amount": 100 + step.code % 10_000,
            "currency": "usd",
            "metadata": {"gen": token},
            "invoice_id": invoice,
        }
        echo = {"customer": customer, "amount": body["amount"], "invoice": invoice, "route": "affixo"}
        bearer = {"Authorization": f"Bearer {world.api_key}"}
        unit = Unit(token, "sale", None, True)
        return Op(
            step.n, "sale", token, f"invoice:{invoice}", "POST", "/v1/track/conversion", bearer, body, [unit], echo
        )
    if "csv" in step.flags:
        return _csv(step, token, world)
    if "expired" in step.flags:
        code = world.codes[step.code % len(world.codes)]
        body = {"ref": code, "referrer": referrer(token)}
        headers = {"Authorization": f"Bearer {world.expired_key}", "User-Agent": BROWSER}
        unit = Unit(token, "click", code, False)
        echo = {"refuse": "expired_key_accepted"}
        return Op(step.n, "affixo", token, None, "POST", "/v1/track/click", headers, body, [unit], echo)
    if "shared" in step.flags:
        tag = next(f[3:] for f in step.flags if f.startswith("ws:"))
        w = world.tenant(tag)
        code = w.codes[step.code % len(w.codes)]
        body = {"ref": code, "referrer": referrer(token), "visitor_id": UNDEFINED}
        headers = {"Authorization": f"Bearer {w.api_key}", "User-Agent": BROWSER}
        unit = Unit(token + suffix(tag), "click", code, False)
        return Op(
            step.n, "affixo", token, None, "POST", "/v1/track/click", headers, body, [unit], {"placeholder": UNDEFINED}
        )
    past = "past" in step.flags
    route = next(r for r in DEEP_ROUTES if r in step.flags)
    # the body is level 1, its metadata 2 (a batch's item is a document of its own: the item 1,
    # its metadata 2); arrays fill the levels below, the innermost holding a string
    depth = depth_bound() + (1 if past else 0)
    meta = {"gen": token, "deep": nested(depth - 2, "leaf")}
    customer = f"c-{token}"
    amount = 100 + step.code % 10_000
    invoice = f"inv-{token}"
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    unit = Unit(token, "sale", None, True)
    echo = {"customer": customer, "amount": amount, "invoice": invoice, "refuse": past}
    if route == "affixo":
        body = {"customer_id": customer, "amount": amount, "currency": "usd", "metadata": meta, "invoice_id": invoice}
        return Op(
            step.n,
            "sale",
            token,
            f"invoice:{invoice}",
            "POST",
            "/v1/track/conversion",
            bearer,
            body,
            [unit],
            {**echo, "route": "affixo"},
        )
    sale_body = {
        "customerExternalId": customer,
        "amount": amount,
        "currency": "usd",
        "paymentProcessor": "stripe",
        "invoiceId": invoice,
        "metadata": meta,
    }
    if route == "batch":
        return Op(
            step.n,
            "batch",
            token,
            None,
            "POST",
            "/v1/events/batch",
            bearer,
            [{"type": "sale", **sale_body}],
            [unit],
            echo,
        )
    return Op(
        step.n,
        "sale",
        token,
        f"invoice:{invoice}",
        "POST",
        "/api/track/sale",
        bearer,
        sale_body,
        [unit],
        {**echo, "route": "refport"},
    )


def _csv(step: Any, token: str, world: World) -> Op:
    """Three clicks and a sale in a CSV file with a BOM, times in Unix seconds two days back;
    the second click's referrer has a quote closed too early (``"…"x``): refused, line 3."""
    from workers.ops.imports import event_id

    from .ops import IMPORT_SOURCE

    at_s = int(time.time()) - 2 * 86_400
    code = world.codes[step.code % len(world.codes)]
    t = [f"{token}.{i}" for i in range(4)]
    lines = [
        "type,id,timestamp,link,referrer,visitor_id,customer_id,amount,currency,invoice_id,metadata",
        f"click,{t[0]},{at_s},{code},{referrer(t[0])},v-{t[0]},,,,,",
        f'click,{t[1]},{at_s + 1},{code},"{referrer(t[1])}"x,v-{t[1]},,,,,',
        f"click,{t[2]},{at_s + 2},{code},{referrer(t[2])},v-{t[2]},,,,,",
        f'sale,{t[3]},{at_s + 3},,,,c-{t[3]},{1000 + step.code},usd,inv-{t[3]},"{{""gen"": ""{t[3]}""}}"',
    ]
    data = "\ufeff" + "\r\n".join(lines) + "\r\n"
    kinds = {0: "click", 2: "click", 3: "sale"}
    ids = [event_id(world.workspace_id, IMPORT_SOURCE, kinds[i], t[i], (at_s + i) * 1000).hex for i in (0, 2, 3)]
    units = [
        Unit(t[0], "click", code, True, {"visitor_id": f"v-{t[0]}"}),
        Unit(t[2], "click", code, True, {"visitor_id": f"v-{t[2]}"}),
        Unit(t[3], "sale", None, True),
    ]
    flags = ("--commissions", "--format", "csv")
    echo = {"ids": ids, "csv": data.encode(), "refused_rows": 1, "flags": flags}
    return Op(step.n, "import", token, None, "IMPORT", "refstream import", {}, lines[1:], units, echo)


# -- Dub's dialect, carelessly (``draw_dub``: a stream of its own, numbered from DUB_FROM) --------

DUB_FROM = 750_000
DUB_EVERY_S = (1.2, 2.4)
DUB_VARIANTS = ("old-name", "quantity", "deferred", "odd-click", "shared", "origin")
QUANTITIES = (1, 1000, 0, 1001)  # at Dub's bounds (1..1000: stored, counting that many), and past them (422)
ODD_CLICKS = ("zeros", "v4", "garbage", "empty")  # unknown clicks (404), an empty one for a customer never seen (400)
# a Dub click from a page of workspace b (allowed_origins ops.B_ORIGINS): its Origin, else its Referer
ORIGINS = {
    "www": ({"Origin": "https://www.b-shop.test"}, True),
    "bare": ({"Origin": "https://b-shop.test"}, True),
    "referer": ({"Referer": "https://shop.b-shop.test/landing"}, True),
    "pay": ({"Origin": "https://pay.b.test"}, True),
    "http": ({"Origin": "http://pay.b.test"}, False),  # an origin is matched with its scheme
    "evil": ({"Origin": "https://evilb-shop.test"}, False),  # a suffix, not a subdomain
    "none": ({}, False),  # a list admits no request that names no page
    "null": ({"Origin": "null"}, False),
}
B_PAGE = ORIGINS["www"][0]


def draw_dub(rng: random.Random, load_s: float) -> list[Any]:
    """Careless Dub traffic, each a small group of steps (kind ``careless``, flag ``dub``,
    ``r:<role>``; ``on``: the step it builds on):

    - ``old-name``: a lead (or sale) naming its customer by ``externalId`` or ``customerId``, or
      by an empty ``customerExternalId`` beside one of them: stored as that customer's;
    - ``quantity``: a lead with ``eventQuantity`` 1 or 1000 (one row counting that many) or 0
      or 1001 (a 422, never stored);
    - ``deferred``: a deferred lead (no row), then its customer's lead with an empty, null or
      absent ``clickId`` (the deferred lead's click, stored once);
    - ``odd-click``: a lead or a direct sale naming a click that does not exist (404), or an
      empty ``clickId`` for a customer never seen (400): never stored;
    - ``shared``: one customer id in workspaces a and b (``g<seed>-d<k>``): a's deferred lead
      is not b's (b's lead with an empty clickId: a 400), a's click is not b's (b's lead or
      direct sale naming it: a 404), each workspace's lead on its own click stored once there;
    - ``origin``: a click in workspace b from a page its hostnames admit, or not (403), or a
      click naming a link under another domain than its own, or a link there is not (404)."""
    from .schedule import OpStep

    out: list[OpStep] = []
    t = rng.uniform(*DUB_EVERY_S) / 2
    k = 0
    first = rng.randrange(len(DUB_VARIANTS))  # every variant before one comes twice
    while t + 4.0 < load_s:
        variant = DUB_VARIANTS[(first + k) % len(DUB_VARIANTS)] if k < len(DUB_VARIANTS) else rng.choice(DUB_VARIANTS)
        base = frozenset({"dub", f"g:{k}"})

        def step(
            at: float, role: str, on: int | None = None, *extra: str, tag: str = "a", base: frozenset[str] = base
        ) -> int:
            flags = base | {f"r:{role}", f"ws:{tag}", *extra}
            out.append(OpStep(DUB_FROM + len(out), at, "careless", False, rng.randrange(1 << 16), flags, (), on))
            return out[-1].n

        def later(lo: float = 0.3, hi: float = 1.0, t: float = t) -> float:
            return t + rng.uniform(lo, hi)

        if variant == "old-name":
            click = step(t, "click")
            field = rng.choice(("externalId", "customerId", "empty"))
            step(later(), rng.choice(("lead", "lead", "sale")), click, f"field:{field}")
        elif variant == "quantity":
            step(later(), "lead", step(t, "click"), f"qty:{rng.choice(QUANTITIES)}")
        elif variant == "deferred":
            deferred = step(later(), "deferred", step(t, "click"), *(["qty:3"] if rng.random() < 0.3 else []))
            form = rng.choice(("empty", "null", "absent"))
            step(later(1.5, 3.0), "complete", deferred, f"form:{form}", *(["qty:2"] if rng.random() < 0.3 else []))
        elif variant == "odd-click":
            odd = rng.choice(ODD_CLICKS)
            step(t, "sale" if odd != "empty" and rng.random() < 0.4 else "lead", None, f"odd:{odd}")
        elif variant == "shared":
            wall = rng.choice(("deferred", "click", "both"))
            click = step(t, "click")
            if wall == "deferred":
                deferred = step(later(), "deferred", click, "shared")
                step(later(1.2, 2.0), "lead", deferred, "shared", "odd:empty", tag="b")
                step(later(1.5, 3.0), "complete", deferred, "shared", "form:empty")
            elif wall == "click":
                step(later(), "lead", click, "shared", "foreign", tag="b")
                step(later(), "sale", click, "shared", "foreign", tag="b")
                step(later(1.0, 2.0), "lead", click, "shared")
            else:
                step(later(), "lead", click, "shared")
                step(later(), "lead", step(t, "click", tag="b"), "shared", tag="b")
        else:
            where = rng.choice([*ORIGINS, "domain"])
            if where == "domain":
                step(t, "click", None, "domain:wrong")
            else:
                step(t, "click", None, f"origin:{where}", tag="b")
        k += 1
        t += rng.uniform(*DUB_EVERY_S)
    return out


def _dub(step: Any, token: str, world: World, history: History) -> Op:
    """A careless Dub step's request (``draw_dub``)."""
    from .ops import dub_click, dub_lead, dub_sale

    role = next(f[2:] for f in step.flags if f.startswith("r:"))
    tag = next((f[3:] for f in step.flags if f.startswith("ws:")), "a")
    w = world.tenant(tag)
    flag = {f.split(":", 1)[0]: f.split(":", 1)[1] for f in step.flags if ":" in f}
    on = history.op(step.on) if step.on is not None else None
    bearer = {"Authorization": f"Bearer {w.api_key}"}
    group = next(f[2:] for f in step.flags if f.startswith("g:"))
    customer = f"g{history.seed}-d{group}" if "shared" in step.flags else token
    if role == "click":
        code = w.codes[step.code % len(w.codes)]
        if flag.get("domain") == "wrong":  # a link named under another domain than its own, or none
            wrong = [(world.dub_link, "shop.test"), (code, "go.gen.test"), (f"no-{token}", "shop.test")]
            code, domain = wrong[step.code % 3]
            return dub_click(step.n, token, world, code, domain=domain, refuse="domain_not_enforced", status=404)
        if "origin" in flag:
            headers, admitted = ORIGINS[flag["origin"]]
            out = dub_click(step.n, token, world, code, tag=tag, headers=headers)
            if not admitted:
                out.echo.update(refuse="origin_not_enforced", status=403)
            return out
        return dub_click(step.n, token, world, code, tag=tag, headers=B_PAGE if tag == "b" else {})
    if role == "complete":  # the deferred lead's customer, its click resolved from the deferred one
        assert on is not None
        deferred = on.body
        body: dict[str, Any] = {"eventName": "Activated", "customerExternalId": on.echo["customer"]}
        if flag["form"] != "absent":
            body["clickId"] = "" if flag["form"] == "empty" else None
        if "qty" in flag:
            body["eventQuantity"] = int(flag["qty"])
        click, code = deferred["clickId"], on.echo["code"]
        out = dub_lead(step.n, token, body, bearer, customer=on.echo["customer"], click=click, code=code, deferred=on.n)
        # a deferred lead never answered 2xx may have remembered nothing: a 400 then
        if not any(a.outcome == "ok" for a in on.attempts):
            out.echo["allow"] = [400]
        out.skipped = None if on.skipped is None else f"its deferred lead (op {on.n}) was never sent"
        return out
    odd = flag.get("odd")
    refused: dict[str, Any]
    if odd is not None and odd != "empty":  # a click that does not exist
        click = {
            "zeros": "clk_" + "0" * 32,
            "v4": "clk_" + uuid.UUID(int=step.code << 64 | history.seed, version=4).hex,
            "garbage": f"click-{token}",
        }[odd]
        code = None
        refused = {"refuse": "unknown_click_accepted", "status": 404}
    elif odd == "empty":  # no click, and no earlier one of this customer in this workspace
        click, code = "", None
        wall = on is not None and on.echo.get("customer") == customer  # another workspace's deferred one
        refused = {"refuse": "tenant_wall" if wall else "no_click_accepted", "status": 400}
    else:
        assert on is not None
        click, code = click_id_of(on), on.units[0].code
        refused = {}
        if "foreign" in step.flags:  # another workspace's click
            code, refused = None, {"refuse": "tenant_wall", "status": 404}
    if role == "sale":
        body = {"amount": 100 + step.code % 10_000, "currency": "usd", "metadata": {"gen": token}}
        body["invoiceId"] = f"inv-{token}"
        sold = customer if "shared" in step.flags else f"c-{token}"
        body.update(_named(flag.get("field"), sold))
        if odd is not None or "foreign" in step.flags:
            body["clickId"] = click
        out = dub_sale(step.n, token, body, bearer, customer=sold, tag=tag, click_code=code)
        out.echo.update(refused)
    else:
        body = {"clickId": click, "eventName": "Sign Up", **_named(flag.get("field"), customer)}
        if role == "deferred":
            body["mode"] = "deferred"
        if "qty" in flag:
            body["eventQuantity"] = int(flag["qty"])
            if not 1 <= body["eventQuantity"] <= 1000:
                refused = {"refuse": True, "status": 422}  # past Dub's bound: bound_not_enforced
        never = "deferred_counted" if role == "deferred" else ""
        out = dub_lead(step.n, token, body, bearer, customer=customer, click=click, code=code, tag=tag, never=never)
        out.echo.update(refused)
    if click is None and odd is None:
        out.skipped = f"its click (op {step.on}) was never accepted"
    return out


def _named(field: str | None, customer: str) -> dict[str, str]:
    """The customer's external id, by the name ``field`` says (Dub's older ones, or an
    empty current name beside an older one), else by ``customerExternalId``."""
    if field == "empty":
        return {"customerExternalId": "", "externalId": customer}
    return {field or "customerExternalId": customer}
