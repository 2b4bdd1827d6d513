"""Issue 64's five cases, drawn as traffic of their own (a stream numbered from
``CASES_FROM``) and judged by ``judge.py``:

- ``shared``: one browser, two customers (docs/privacy.md, *A browser two customers
  share*): a click, two leads naming it with two customer ids (each with an email and a
  name), then one of them erased; the other stays whole, ``GET /v1/customers/<other>`` a 200
  with their email and name, the erased one a 404;
- ``fp``: clicks whose ``fingerprint`` is a placeholder (``undefined``, ``null``, ``""``,
  ``0``, ``[object Object]``, spelled in other cases and with spaces around), through
  Affixo's route and as batch items, each from a browser of its own: no two browsers are
  handed one visitor (docs/http-api.md, *Placeholder ids*);
- ``rules``: the commission rules of a program of its own (``World.rc_program``) changed
  between a customer's events: a live lead under ``RULES[0]``, stored (awaited: the
  customer answers), then the rules changed, an older lead and a sale of theirs imported,
  the rules changed again, a refund of the sale: the live lead's commission is taken back
  in its own currency, the clawback in the sale commission's, and each source nets to the
  rules it earned under (docs/http-api.md, *Commissions and payouts*);
- ``identity``: the affiliate ``World.id_affiliate`` (external id ``ID_EXTERNAL``, name
  ``ID_NAME``) erased, after a customer of that name bought on their link with an invoice
  numbered as their external id: the customer's name and invoice stay, the affiliate's own
  fields go (docs/privacy.md, *Affiliates and participants*);
- ``dnt``: a long do-not-track list (``DNT_ENTRIES``: visitors, a customer, an address, and
  placeholders, refused) put by ``POST /v1/suppressions`` many at once, then, past the
  edges' refresh, clicks and a lead of listed identities (answered, stored nowhere) among
  clicks of others (stored as ever); the listing ``GET /v1/suppressions`` pages through
  every entry exactly once (docs/privacy.md, *Do not track*).
"""

from __future__ import annotations

import random
import time
from typing import Any

from ..._world import BROWSER
from .history import History, Op, Unit
from .ops import IMPORT_SOURCE, World, _hex, agent, click_id_of, referrer

CASES_FROM = 900_000
# the placeholder fingerprints a careless tracker sends (``ingest.contract.ids.PLACEHOLDERS``)
FP_PLACEHOLDERS = ("undefined", "null", "", "0", "[object Object]", " NULL ", "Undefined", "anonymous", "\u200bnull")
FP_CLICKS = 8  # Affixo clicks of a placeholder fingerprint a seed
FP_SHARED = 3  # the first placeholders, each sent by two browsers or more
FP_BATCHES = 2  # batches of two or three such click items
# the rules of the program ``World.rc_program``: set at setup, then changed twice during the run
RULES: tuple[dict[str, Any], ...] = (
    {"sale_bps": 1000, "sale_flat": {"usd": 25}, "lead_flat": 100, "lead_currency": "usd"},
    {"sale_bps": 2500, "sale_flat": {"eur": 300}, "lead_flat": 300, "lead_currency": "eur"},
    {"sale_bps": 500, "sale_flat": {"jpy": 50}, "lead_flat": 700, "lead_currency": "jpy"},
)
RC_LINK = "rulechanges"  # the code of its one link
POLL_S = 25.0  # how long the rules' scenario waits for its live lead to be stored
ID_LINK = "samlee"  # the identity case's affiliate's link
ID_EXTERNAL = "AFF-1042"  # the affiliate's external id: the customer's invoice too
ID_NAME = "Sam Lee"  # the affiliate's name: the customer's too
DNT_ENTRIES = {"short": 500, "full": 4000}  # how long the do-not-track list grows (short: the suite runs beside it)
DNT_PLACEHOLDERS = ("undefined", "null", "[object Object]")  # each refused, 400
DNT_IP = "192.0.2.77"  # a listed address (no other operation's)
DNT_AFTER_S = 6.6  # from the list's last entry to its identities' events: past the edges' refresh
DNT_CONCURRENCY = 8


def draw(rng: random.Random, load_s: float, mode: str) -> list[Any]:
    from .schedule import OpStep

    out: list[OpStep] = []

    def step(at: float, kind: str, *flags: str, on: int | None = None, items: tuple[str, ...] = ()) -> int:
        out.append(
            OpStep(
                CASES_FROM + len(out), at, kind, False, rng.randrange(1 << 16), frozenset({"case", *flags}), items, on
            )
        )
        return out[-1].n

    for _ in range(2):  # shared: a click, two leads on it, one of the two erased
        t = rng.uniform(1.0, max(1.5, load_s - 6.0))
        click = step(t, "affitor", "shared")
        first = step(t + rng.uniform(0.3, 1.0), "lead", "shared", on=click)
        second = step(t + rng.uniform(0.5, 1.5), "lead", "shared", "second", on=first)
        step(t + rng.uniform(1.5, 3.0), "erase", "shared", rng.choice(("erase:first", "erase:second")), on=second)
    # fp: Affixo's clicks of a placeholder fingerprint, several browsers sending the same
    # one (two browsers of one placeholder are what a placeholder taken for a fingerprint
    # would merge), and the rest of the list once each
    for i in range(FP_CLICKS):
        fp = i % FP_SHARED if i < 2 * FP_SHARED else rng.randrange(len(FP_PLACEHOLDERS))
        step(rng.uniform(0.5, load_s), "affixo", "fp", f"fp:{fp}")
    for _ in range(FP_BATCHES):
        n = rng.randint(2, 3)
        fps = tuple(f"fp:{rng.randrange(FP_SHARED)}" for _ in range(n))
        step(rng.uniform(0.5, load_s), "batch", "fp", items=fps)
    t = rng.uniform(1.0, 3.0)  # rules: one customer's history across two changes of rules
    chain = step(t, "affitor", "rules")
    for kind in ("lead", "poll", "rules:1", "import", "rules:2", "refund"):
        chain = step(t, kind, "rules", on=chain)
    t = rng.uniform(1.0, 4.0)  # identity: a customer named as the affiliate, then the affiliate erased
    chain = step(t, "affitor", "identity")
    for kind in ("lead", "sale"):
        chain = step(t + rng.uniform(0.2, 1.0), kind, "identity", on=chain)
    step(t + rng.uniform(1.0, 3.0), "erase-affiliate", "identity", on=chain)
    bulk = step(rng.uniform(0.3, 1.0), "suppress-bulk", "dnt", f"size:{DNT_ENTRIES.get(mode, DNT_ENTRIES['short'])}")
    for i in range(6):  # dnt: listed identities' events and others', once every edge read the list
        step(0.0, "affixo", "dnt", "listed" if i % 2 == 0 else "free", on=bulk)
    step(0.0, "batch", "dnt", on=bulk, items=("listed-visitor", "free", "listed-ip", "free"))
    dnt_click = step(0.0, "affitor", "dnt", on=bulk)
    step(0.0, "lead", "dnt", "listed", on=dnt_click)
    return out


def flag(step: Any, name: str) -> str | None:
    return next((f.split(":", 1)[1] for f in step.flags if f.startswith(name + ":")), None)


def listed_customer(seed: int, bulk_n: int) -> str:
    """The customer the list names: the dnt lead's token (``draw``: the last step)."""
    return f"g{seed}-{bulk_n + 9}"


def dnt_values(seed: int, bulk_n: int, size: int) -> list[dict[str, str]]:
    """The list's entries: visitors, the dnt lead's customer, an address, and placeholders."""
    values = [{"kind": "visitor", "value": f"v-dnt{seed}-{i}"} for i in range(size - 2 - len(DNT_PLACEHOLDERS))]
    values += [{"kind": "customer", "value": listed_customer(seed, bulk_n)}, {"kind": "ip", "value": DNT_IP}]
    return values + [{"kind": "visitor", "value": p} for p in DNT_PLACEHOLDERS]


def make(step: Any, world: World, history: History) -> Op:
    token = f"g{history.seed}-{step.n}"
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    on = history.op(step.on) if step.on is not None else None
    case = next(f for f in ("shared", "fp", "rules", "identity", "dnt") if f in step.flags)
    code = {"rules": world.rc_code, "identity": world.id_code}.get(case) or world.codes[step.code % len(world.codes)]

    def op(kind: str, method: str, path: str, headers: dict[str, str], body: Any, units: list[Unit], **echo: Any) -> Op:
        return Op(
            step.n, kind, token, echo.pop("key", None), method, path, headers, body, units, {"case": case, **echo}
        )

    body: dict[str, Any]
    if step.kind == "affitor":  # a browser's click: its answer names the click id a lead uses
        body = {"affiliate_url": f"https://shop.test/landing?aff={code}", "referrer_url": referrer(token)}
        headers = {"User-Agent": agent(token)}
        unit = Unit(token, "click", code, False, {"user_agent": headers["User-Agent"]})
        return op("affitor", "POST", "/api/v1/track/click", headers, body, [unit], partner_code=code)
    if step.kind == "lead":
        assert on is not None
        click_op = history.op(on.echo["click_op"]) if "click_op" in on.echo else on
        assert click_op is not None
        click, lead_code = click_id_of(click_op), click_op.units[0].code
        body = {"clickId": click, "eventName": "Sign Up", "customerExternalId": token}
        if case in ("shared", "identity"):
            body["customerEmail"] = f"{token}@shared.test"
            body["customerName"] = ID_NAME if case == "identity" else f"Name {token}"
        listed = listed_customer(history.seed, step.on - 8) if case == "dnt" else None
        expect = {"click_id": _hex(click, "clk_")} if click else {}
        unit = Unit(token, "lead", lead_code, True, expect, name="Sign Up")
        if listed is not None:
            assert listed == token, (listed, token)
            unit.listed_by, unit.listed = step.on - 8, token
        out = op("lead", "POST", "/api/track/lead", bearer, body, [unit], click=click, code=lead_code)
        out.echo.update(click_op=click_op.n, email=body.get("customerEmail"), name=body.get("customerName"))
        if "second" in step.flags:  # shared: the browser's first customer's lead
            out.echo["lead_before"] = on.n
        out.skipped = None if click else f"its click (op {click_op.n}) was never accepted"
        return out
    if step.kind == "erase":  # shared: one of the browser's two customers
        assert on is not None and on.kind == "lead"
        first = history.op(on.echo["lead_before"]) if "lead_before" in on.echo else None
        erased, kept = (first, on) if flag(step, "erase") == "first" else (on, first)
        assert erased is not None and kept is not None
        eraser = {"Authorization": f"Bearer {world.erase_key}"}
        out = op("erase", "DELETE", f"/v1/customers/{erased.token}", eraser, None, [])
        out.echo.update(customer=erased.token, lead=erased.n, shared=True, kept=kept.n)
        return out
    if step.kind == "affixo" and case == "fp":
        fp = FP_PLACEHOLDERS[int(flag(step, "fp") or 0)]
        ua = agent(token)
        body = {"ref": code, "referrer": referrer(token), "fingerprint": fp}
        unit = Unit(token, "click", code, False, {"user_agent": ua})
        return op("affixo", "POST", "/v1/track/click", {**bearer, "User-Agent": ua}, body, [unit], placeholder=fp)
    if step.kind == "affixo":  # dnt: a listed visitor's click, or another's
        bulk = step.on
        visitor = f"v-dnt{history.seed}-{step.n - bulk}" if "listed" in step.flags else f"v-free-{token}"
        body = {"ref": code, "referrer": referrer(token), "visitor_id": visitor}
        unit = Unit(token, "click", code, False, {"visitor_id": visitor})
        if "listed" in step.flags:
            unit.listed_by, unit.listed = bulk, visitor
        out = op("affixo", "POST", "/v1/track/click", {**bearer, "User-Agent": BROWSER}, body, [unit])
        out.echo.update(visitor_id=visitor, after=bulk)
        return out
    if step.kind == "batch":
        return _batch(step, token, world, history, op, bearer)
    if step.kind == "poll":  # until the live lead's customer answers (stored, with its commission)
        assert on is not None
        out = op("poll", "GET", f"/v1/customers/{on.token}", bearer, None, [], lead=on.n, allow=[404])
        out.skipped = None if on.skipped is None else "its lead was never sent"
        return out
    if step.kind.startswith("rules:"):
        index = int(step.kind.split(":")[1])
        path = f"/v1/programs/{world.rc_program}/commission"
        out = op("rules", "PATCH", path, bearer, {**RULES[index], "duration": "lifetime", "hold_days": 0}, [])
        out.echo.update(rules=index, attempts=12)
        return out
    if step.kind == "import":
        return _import(step, token, world, history)
    if step.kind == "refund":
        assert on is not None
        sale = history.op(step.on - 1)  # ..., import, rules:2, refund
        assert sale is not None and sale.kind == "import"
        invoice, amount = sale.echo["invoice"], sale.echo["amount"]
        body = {"invoiceId": invoice, "refundId": f"rf-{token}", "amount": max(1, amount // 3)}
        out = op("refund", "POST", "/api/track/refund", bearer, body, [], invoice=invoice, amount=body["amount"])
        out.key = f"refund:rf-{token}"
        if not any(a.outcome == "ok" for a in sale.attempts):
            out.skipped = f"its sale (op {sale.n}) was never imported"
        return out
    if step.kind == "sale":  # identity: the customer's, invoiced with the affiliate's external id
        assert on is not None
        body = {
            "customerExternalId": on.token,
            "amount": 5000 + step.code % 1000,
            "currency": "usd",
            "paymentProcessor": "stripe",
            "invoiceId": ID_EXTERNAL,
            "metadata": {"gen": token},
        }
        echo = {"customer": on.token, "amount": body["amount"], "invoice": ID_EXTERNAL, "route": "refport"}
        out = op("sale", "POST", "/api/track/sale", bearer, body, [Unit(token, "sale", None, True)], **echo)
        out.key = f"invoice:{ID_EXTERNAL}"
        return out
    if step.kind == "erase-affiliate":
        eraser = {"Authorization": f"Bearer {world.erase_key}"}
        return op("erase-affiliate", "DELETE", f"/v1/affiliates/{world.id_affiliate}", eraser, None, [])
    assert step.kind == "suppress-bulk", step.kind
    size = int(flag(step, "size") or DNT_ENTRIES["short"])
    values = dnt_values(history.seed, step.n, size)
    return op("suppress-bulk", "POST", "/v1/suppressions", bearer, values, [], concurrency=DNT_CONCURRENCY)


def _batch(step: Any, token: str, world: World, history: History, op: Any, bearer: dict[str, str]) -> Op:
    """fp: click items of placeholder fingerprints (no visitor id), each a browser of its
    own; dnt: items of a listed visitor, from a listed address, and of others."""
    items: list[dict[str, Any]] = []
    units: list[Unit] = []
    for i, kind in enumerate(step.items):
        t = f"{token}.{i}"
        c = world.codes[(step.code + i) % len(world.codes)]
        item: dict[str, Any] = {"type": "click", "ref": c, "referrer": referrer(t), "user_agent": agent(t)}
        item["ip"] = DNT_IP if kind == "listed-ip" else f"203.0.113.{(step.n + i) % 250 + 1}"
        unit = Unit(t, "click", c, False, {"user_agent": item["user_agent"]})
        if kind.startswith("fp:"):
            item["fingerprint"] = FP_PLACEHOLDERS[int(kind[3:])]
        else:
            item["visitor_id"] = unit.expect["visitor_id"] = (
                f"v-dnt{history.seed}-{step.n - step.on}" if kind == "listed-visitor" else f"v-{t}"
            )
            if kind.startswith("listed"):
                unit.listed_by, unit.listed = step.on, DNT_IP if kind == "listed-ip" else item["visitor_id"]
        items.append(item)
        units.append(unit)
    out: Op = op("batch", "POST", "/v1/events/batch", bearer, items, units)
    if "fp" in step.flags:
        out.echo["placeholder"] = [i.get("fingerprint") for i in items]
    else:
        out.echo["after"] = step.on
    return out


def _import(step: Any, token: str, world: World, history: History) -> Op:
    """rules: the customer's older lead (three days back, on the program's link) and a sale
    of theirs, imported with ``--commissions`` after the first change of rules."""
    from workers.ops.imports import event_id

    lead = history.op(step.on - 2)  # affitor, lead, poll, rules:1, import
    assert lead is not None and lead.kind == "lead"
    now_ms = int(time.time() * 1000)
    currency = ("usd", "eur", "jpy")[step.code % 3]
    rows: list[dict[str, Any]] = [
        {
            "type": "lead",
            "id": f"{token}.0",
            "timestamp": now_ms - 3 * 86_400_000,
            "link": world.rc_code,
            "customer_id": lead.token,
            "event_name": "Trial",
        },
        {
            "type": "sale",
            "id": f"{token}.1",
            "timestamp": now_ms - 60_000,
            "customer_id": lead.token,
            "amount": 10_000 + step.code % 5000,
            "currency": currency,
            "invoice_id": f"inv-{token}",
            "metadata": {"gen": f"{token}.1"},
        },
    ]
    ids = [event_id(world.workspace_id, IMPORT_SOURCE, r["type"], r["id"], r["timestamp"]).hex for r in rows]
    units = [
        Unit(lead.token, "lead", world.rc_code, True, name="Trial"),
        Unit(f"{token}.1", "sale", None, True),
    ]
    echo = {"ids": ids, "case": "rules", "invoice": f"inv-{token}", "amount": rows[1]["amount"], "lead": lead.n}
    out = Op(step.n, "import", token, None, "IMPORT", "refstream import", {}, rows, units, echo)
    rules = history.op(step.on)
    if rules is None or not any(a.outcome == "ok" for a in rules.attempts):
        out.skipped = "its change of rules was never answered"
    return out
