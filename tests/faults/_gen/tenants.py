"""Other tenants: a second workspace (``b``) beside the run's own (``a``), and a third (``c``)
made, used and deleted while the run goes on. They share what careless clients share: the
same client-chosen customer ids, and the visitor id ``"undefined"`` that a tracker sends
when its cookie read failed.

For each pair ``k``, a customer id ``g<seed>-s<k>`` is imported into both workspaces (a
click of visitor ``"undefined"`` and a lead on it naming the customer, with an email), then
one of four things happens (``SCENARIOS``):

- ``a-erases``: ``a`` erases the customer; ``b`` sells to its own (the lead dated 60 days
  back, past the 30-day cookie window, under the ``lifetime`` rule: attributed and paid),
  and ``b`` imports a full refund of that sale without ``--commissions`` (a clawback);
- ``b-erases``: ``b`` erases, ``a`` keeps;
- ``both-erase``: both erase within a moment of each other;
- ``c-deleted``: ``b`` erases; ``c`` is made, imports the same customer, erases them and is
  deleted; then ``b`` imports a new lead naming its erased customer again.

A row's token is its request's token with ``@b`` (``@c``) for another workspace's row
(``checker.ROWS``), so exactly-once is judged per workspace; the checker's ``walls`` judges
that an erasure changed no other workspace's customer (``walls.py``).
"""

from __future__ import annotations

import random
import time
from typing import Any

from .history import History, Op, Unit
from .ops import IMPORT_SOURCE, World, referrer

TENANTS_FROM = 600_000
PAIR_EVERY_S = (2.0, 4.0)
PAIR_TAKES_S = 6.0  # from a pair's imports to its last step
MAX_PAIRS = 6  # each pair runs two to four commands (imports): a seed's machine has two cores
SCENARIOS = ("a-erases", "b-erases", "both-erase", "c-deleted")
OLD_DAYS = 60  # the lead's age for a lifetime sale: past the program's 30-day cookie window
UNDEFINED = "undefined"  # the visitor id careless trackers send: no one's (ingest.contract.ids.PLACEHOLDERS)
DAY_MS = 86_400_000


def tag_of(step_flags: frozenset[str]) -> str:
    return next((f[3:] for f in step_flags if f.startswith("ws:")), "a")


def pair_of(step_flags: frozenset[str]) -> int:
    return next(int(f[5:]) for f in step_flags if f.startswith("pair:"))


def shared_id(seed: int, pair: int) -> str:
    return f"g{seed}-s{pair}"


def email_of(customer: str, tag: str) -> str:
    return f"{customer}@{tag}.test"


def suffix(tag: str) -> str:
    """What a row of workspace ``tag`` adds to its token (``a``'s rows: nothing)."""
    return "" if tag == "a" else f"@{tag}"


def draw(rng: random.Random, load_s: float) -> list[Any]:
    """The pairs' steps (schedule.OpStep), from ``TENANTS_FROM`` on."""
    from .schedule import OpStep

    out: list[OpStep] = []
    t = rng.uniform(*PAIR_EVERY_S) / 2
    k = 0
    first = rng.randrange(len(SCENARIOS))  # every scenario before one comes twice
    while t + PAIR_TAKES_S < load_s and k < MAX_PAIRS:
        scenario = SCENARIOS[(first + k) % len(SCENARIOS)] if k < len(SCENARIOS) else rng.choice(SCENARIOS)
        old = scenario == "a-erases"
        base = frozenset({f"pair:{k}", scenario} | ({"old"} if old else set()))

        def step(at: float, kind: str, tag: str, on: int | None = None, flags: frozenset[str] = base) -> int:
            out.append(
                OpStep(TENANTS_FROM + len(out), at, kind, False, rng.randrange(1 << 16), flags | {f"ws:{tag}"}, (), on)
            )
            return out[-1].n

        in_a = step(t, "t-import", "a")
        in_b = step(t + rng.uniform(0.0, 0.5), "t-import", "b")
        erase_at = t + rng.uniform(2.0, 4.0)
        if scenario == "a-erases":
            step(erase_at, "erase", "a", in_a)
            sale = step(erase_at + rng.uniform(-1.0, 1.0), "t-sale", "b", in_b)
            step(erase_at + rng.uniform(2.5, 4.0), "t-refund", "b", sale)
        elif scenario == "b-erases":
            step(erase_at, "erase", "b", in_b)
        elif scenario == "both-erase":
            step(erase_at, "erase", "a", in_a)
            step(erase_at + rng.uniform(0.0, 0.3), "erase", "b", in_b)
        else:
            erased = step(erase_at, "erase", "b", in_b)
            gone = step(erase_at + rng.uniform(0.5, 1.5), "t-workspace", "c", erased)
            step(erase_at + rng.uniform(2.0, 3.0), "t-again", "b", gone)
        k += 1
        t += rng.uniform(*PAIR_EVERY_S)
    return out


def import_op(
    n: int,
    kind: str,
    token: str,
    workspace: str,
    rows: list[dict[str, Any]],
    units: list[Unit],
    *flags: str,
    **echo: Any,
) -> Op:
    """``refstream import`` of ``rows`` into ``workspace``: ``flags`` go on its command line."""
    from workers.ops.imports import event_id

    ids = [event_id(workspace, IMPORT_SOURCE, r["type"], r["id"], r["timestamp"]).hex for r in rows]
    return Op(
        n,
        kind,
        token,
        None,
        "IMPORT",
        "refstream import",
        {},
        rows,
        units,
        {"ids": ids, "workspace": workspace, "flags": flags, **echo},
    )


def visitor_of(customer: str) -> str:
    """The pair's visitor id, the same in every workspace (two trackers that chose alike)."""
    return customer.replace("-s", "-v", 1)


def pair_rows(token: str, customer: str, tag: str, code: str, days_back: int, n: int) -> list[dict[str, Any]]:
    """A click of the pair's shared visitor id and a lead on it naming ``customer``, ``days_back`` ago."""
    at = int(time.time() * 1000) - days_back * DAY_MS
    return [
        {
            "type": "click",
            "id": f"{token}.0",
            "timestamp": at,
            "link": code,
            "referrer": referrer(f"{token}.0"),
            "visitor_id": visitor_of(customer),
            "ip": f"198.51.100.{n % 250 + 1}",
        },
        {
            "type": "lead",
            "id": f"{token}.1",
            "timestamp": at + 60_000,
            "click": f"{token}.0",
            "customer_id": customer,
            "email": email_of(customer, tag),
        },
    ]


def make(step: Any, world: World, history: History) -> Op:
    """The request of a tenant step (``on``: the operation it follows, done by now)."""
    token = f"g{history.seed}-{step.n}"
    tag = tag_of(step.flags)
    w = world if step.kind == "t-workspace" else world.tenant(tag)  # c is made by the operation itself
    customer = shared_id(history.seed, pair_of(step.flags))
    on = history.op(step.on) if step.on is not None else None
    sfx = suffix(tag)
    if step.kind == "t-import":
        code = w.codes[step.code % len(w.codes)]
        rows = pair_rows(token, customer, tag, code, OLD_DAYS if "old" in step.flags else 2, step.n)
        units = [
            Unit(f"{token}.0{sfx}", "click", code, True),  # its visitor: scrubbed where the pair is erased
            Unit(customer + sfx, "lead", code, True),
        ]
        out = import_op(
            step.n, "import", token, w.workspace_id, rows, units, "--commissions", customer=customer, tag=tag, code=code
        )
        out.units[1].expect = {"click_id": out.echo["ids"][0]}
        return out
    if step.kind == "erase":  # the pair's customer, in one workspace
        assert on is not None
        eraser = {"Authorization": f"Bearer {w.erase_key}"}
        echo = {"customer": customer, "lead": on.n, "tag": tag}
        return Op(step.n, "erase", token, None, "DELETE", f"/v1/customers/{customer}", eraser, None, [], echo)
    if step.kind == "t-sale":  # attributed through a lead 60 days old, under the lifetime rule
        assert on is not None
        imported = any(a.outcome == "ok" for a in on.attempts)
        body = {
            "customerExternalId": customer,
            "amount": 10_000 + step.code % 1000,
            "currency": "usd",
            "paymentProcessor": "stripe",
            "invoiceId": f"inv-{token}",
            "metadata": {"gen": token},
        }
        unit = Unit(token + sfx, "sale", on.echo["code"] if imported else None, True)
        echo = {"customer": customer, "amount": body["amount"], "invoice": body["invoiceId"], "route": "refport"}
        headers = {"Authorization": f"Bearer {w.api_key}"}
        return Op(
            step.n,
            "sale",
            token,
            f"invoice:{body['invoiceId']}",
            "POST",
            "/api/track/sale",
            headers,
            body,
            [unit],
            echo,
        )
    if step.kind == "t-refund":  # the sale's full refund, imported without --commissions
        assert on is not None
        row = {
            "type": "refund",
            "id": token,
            "timestamp": int(time.time() * 1000),
            "invoice_id": on.echo["invoice"],
            "refund_id": f"rf-{token}",
        }
        out = import_op(step.n, "import", token, w.workspace_id, [row], [], refund=f"rf-{token}", tag=tag)
        if not any(a.outcome == "ok" for a in on.attempts):
            out.skipped = f"its sale (op {on.n}) was never accepted"
        return out
    if step.kind == "t-workspace":  # made, used, erased in, deleted: by the operator (cluster.Clients)
        rows = pair_rows(token, customer, tag, f"c{step.n}", 2, step.n)
        return Op(
            step.n,
            "t-workspace",
            token,
            None,
            "OPERATOR",
            "workspace c",
            {},
            rows,
            [],
            {"customer": customer, "code": f"c{step.n}"},
        )
    assert step.kind == "t-again", step.kind  # a new lead naming b's erased customer, after c's deletion
    rows = [
        {
            "type": "lead",
            "id": token,
            "timestamp": int(time.time() * 1000) - DAY_MS,
            "customer_id": customer,
            "event_name": "Upgraded",
            "email": email_of(customer, tag),
            "link": w.codes[step.code % len(w.codes)],
        }
    ]  # (a second "Sign Up" of theirs is their first's)
    unit = Unit(token + sfx, "lead", rows[0]["link"], True)
    return import_op(
        step.n, "import", token, w.workspace_id, rows, [unit], "--commissions", customer=customer, tag=tag, again=True
    )
