"""What careless clients send, beside the well-formed traffic: sales whose metadata nests at
the JSON bound and one level past it (``deep``), through Refport's route, Affixo's and the
batch route; clicks of the visitor ``"undefined"`` in two workspaces at once (``shared``);
a customer id sent with a no-break space and a zero-width space around it, and erased a
moment later by another spelling of it, percent-encoded in the path (``odd``): whatever a
route accepted, the API erases (``ingest/contract/ids.py``).

At the bound a request is a sale like any other: stored once (it has an invoice). Past it,
it is refused with a 400 in its route's own shape, and never stored: the checker counts any
other answer as ``bound_not_enforced`` (a 2xx) or ``5xx``, and a stored row as
``refusal_counted`` (``checker.py``).
"""

from __future__ import annotations

import random
from typing import Any

from .history import History, Op, Unit
from .ops import BROWSER, REFERRER, World
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
        elif roll < 0.8:
            flags = {"shared", f"ws:{rng.choice('ab')}"}
        else:
            flags = {"odd"}
        out.append(OpStep(CARELESS_FROM + len(out), t, "careless", False, rng.randrange(1 << 16), frozenset(flags)))
        if "odd" in flags and t + 3.0 < load_s:
            on = out[-1].n
            out.append(OpStep(CARELESS_FROM + len(out), t + rng.uniform(2.0, 3.0), "careless", False,
                              rng.randrange(1 << 16), frozenset({"odd-erase"}), (), on))  # fmt: skip
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
        echo = {"customer": customer, "lead": sale.n}
        return Op(step.n, "erase", token, None, "DELETE", "/v1/customers/" + ODD_PATH.format(customer), eraser, None,
                  [], echo)  # fmt: skip
    if "odd" in step.flags:  # a conversion through Affixo's route, its answer naming its event
        customer = f"c-{token}"
        invoice = f"inv-{token}"
        body = {"customer_id": ODD.format(customer), "amount": 100 + step.code % 10_000, "currency": "usd",
                "metadata": {"gen": token}, "invoice_id": invoice}  # fmt: skip
        echo = {"customer": customer, "amount": body["amount"], "invoice": invoice, "route": "affixo"}
        bearer = {"Authorization": f"Bearer {world.api_key}"}
        unit = Unit(token, "sale", None, True)
        return Op(step.n, "sale", token, f"invoice:{invoice}", "POST", "/v1/track/conversion", bearer, body, [unit],
                  echo)  # fmt: skip
    if "shared" in step.flags:
        tag = next(f[3:] for f in step.flags if f.startswith("ws:"))
        w = world.tenant(tag)
        code = w.codes[step.code % len(w.codes)]
        body = {"ref": code, "referrer": REFERRER + token, "visitor_id": UNDEFINED}
        headers = {"Authorization": f"Bearer {w.api_key}", "User-Agent": BROWSER}
        unit = Unit(token + suffix(tag), "click", code, False, {"visitor_id": UNDEFINED})
        return Op(step.n, "affixo", token, None, "POST", "/v1/track/click", headers, body, [unit],
                  {"visitor_id": UNDEFINED})  # fmt: skip
    past = "past" in step.flags
    route = next(r for r in DEEP_ROUTES if r in step.flags)
    # the body is level 1, its metadata 2 (a batch: the list 1, an item 2, its metadata 3);
    # arrays fill the levels below, the innermost holding a string
    depth = depth_bound() + (1 if past else 0)
    top = 3 if route == "batch" else 2
    meta = {"gen": token, "deep": nested(depth - top, "leaf")}
    customer = f"c-{token}"
    amount = 100 + step.code % 10_000
    invoice = f"inv-{token}"
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    unit = Unit(token, "sale", None, True)
    echo: dict[str, Any] = {"customer": customer, "amount": amount, "invoice": invoice, "refuse": past}
    if route == "affixo":
        body: Any = {"customer_id": customer, "amount": amount, "currency": "usd", "metadata": meta,
                     "invoice_id": invoice}  # fmt: skip
        return Op(step.n, "sale", token, f"invoice:{invoice}", "POST", "/v1/track/conversion", bearer, body, [unit],
                  {**echo, "route": "affixo"})  # fmt: skip
    sale = {"customerExternalId": customer, "amount": amount, "currency": "usd", "paymentProcessor": "stripe",
            "invoiceId": invoice, "metadata": meta}  # fmt: skip
    if route == "batch":
        return Op(step.n, "batch", token, None, "POST", "/v1/events/batch", bearer, [{"type": "sale", **sale}], [unit],
                  echo)  # fmt: skip
    return Op(step.n, "sale", token, f"invoice:{invoice}", "POST", "/api/track/sale", bearer, sale, [unit],
              {**echo, "route": "refport"})  # fmt: skip
