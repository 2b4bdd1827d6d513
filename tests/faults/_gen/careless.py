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
from typing import Any

from ..._world import BROWSER
from .history import History, Op, Unit
from .ops import REFERRER, World
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
        body = {"ref": code, "referrer": REFERRER + token}
        headers = {"Authorization": f"Bearer {world.expired_key}", "User-Agent": BROWSER}
        unit = Unit(token, "click", code, False)
        echo = {"refuse": "expired_key_accepted"}
        return Op(step.n, "affixo", token, None, "POST", "/v1/track/click", headers, body, [unit], echo)
    if "shared" in step.flags:
        tag = next(f[3:] for f in step.flags if f.startswith("ws:"))
        w = world.tenant(tag)
        code = w.codes[step.code % len(w.codes)]
        body = {"ref": code, "referrer": REFERRER + token, "visitor_id": UNDEFINED}
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
        f"click,{t[0]},{at_s},{code},{REFERRER}{t[0]},v-{t[0]},,,,,",
        f'click,{t[1]},{at_s + 1},{code},"{REFERRER}{t[1]}"x,v-{t[1]},,,,,',
        f"click,{t[2]},{at_s + 2},{code},{REFERRER}{t[2]},v-{t[2]},,,,,",
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
