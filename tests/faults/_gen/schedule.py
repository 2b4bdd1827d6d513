"""The seeded schedule: from one integer, the topology, every client operation (when, which
kind, keyed or not, on which link, its variant) and every fault (when, which, on what, for
how long). Nothing here looks at the system: the same seed gives the same schedule, so a
failing seed runs the same operations and faults again (the system's own timing aside).

Faults are drawn from a shuffled deck of the kinds the topology allows (every kind comes up
before one comes twice); two faults on one resource never overlap, faults on different
resources may. No fault starts in the run's first ``warmup_s`` or last ``tail_s``.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

TOPOLOGIES = ("single", "sentinel")  # one Redis behind proxies / a primary, a replica and Sentinel at replicas:1

OP_WEIGHTS = {
    "biore": 0.2,
    "affitor": 0.13,
    "affixo": 0.12,
    "redirect": 0.06,
    "lead": 0.12,
    "convert": 0.1,
    "batch": 0.1,
    "generate": 0.05,
    "validate": 0.04,
    "stats": 0.05,
    "link": 0.03,
}
KEYABLE = {"biore", "affitor", "affixo", "lead", "batch", "generate", "link"}  # routes that take an Idempotency-Key
CLICKS_WITH_IDS = {"affitor", "redirect"}  # their answer names the click id a lead can use

ROLES = ("edge", "worker", "archiver")
PROXIES = {"single": ("edge-redis", "worker-redis", "edge-pg", "worker-pg"), "sentinel": ("edge-pg", "worker-pg")}
CLOCK_OFFSETS_S = (-3 * 86400.0, -3600.0, 3600.0, 3 * 86400.0, 120 * 86400.0)

# kind: (resource, topologies); two faults on one resource never overlap
FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "redis-stall": ("redis", TOPOLOGIES),
    "redis-kill": ("redis", TOPOLOGIES),
    "redis-restart": ("redis", TOPOLOGIES),
    "redis-full": ("redis", TOPOLOGIES),
    "sentinel-failover": ("redis", ("sentinel",)),
    "pg-kill": ("postgres", TOPOLOGIES),
    "pg-read-only": ("postgres", TOPOLOGIES),
    "pg-slow": ("postgres", TOPOLOGIES),
    "process-kill": ("procs", TOPOLOGIES),
    "process-stop": ("procs", TOPOLOGIES),
    "clock-skew": ("procs", TOPOLOGIES),
    "partition": ("net", TOPOLOGIES),
    "trim-storm": ("trim", TOPOLOGIES),
    "replay": ("replay", TOPOLOGIES),
}
# kinds that joined after seeds were published: drawn from a stream of their own, so that
# an older seed keeps the schedule it was reported with (docs/testing.md)
LATER_FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "partition-count": ("layout", TOPOLOGIES),
}
# an edge's supervisor replaced (``refstream serve --take-over``): a stream of its own too
TAKEOVER_FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "edge-takeover": ("procs", TOPOLOGIES),
}
TAKEOVER_SPACING = 6.0  # one or two a seed
# shards (``shards.py``), a stream of their own too: shard b's Postgres stopped (``-m
# immediate``) and started again; a workspace (``a`` or ``b``, the target) moved to the other
# shard under load (``refstream workspace move``), its old copy dropped after it when the
# param is 1 (``--drop-old``); and where the two workspaces start (``Schedule.placed``)
SHARD_FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shard-outage": ("shard", TOPOLOGIES),
    "workspace-move": ("move", TOPOLOGIES),
}
SHARD_SPACING = 3.0  # two or three a short seed
SHARDS = ("default", "b")
ALL_FAULTS = {**FAULTS, **LATER_FAULTS, **TAKEOVER_FAULTS, **SHARD_FAULTS}
# operations that joined after seeds were published, drawn the same way (a stream of their
# own, numbered from LATER_OPS_FROM so the others keep their numbers and tokens): sales,
# through Refport, Affixo or the batch route, on an earlier lead's customer or a new one
LATER_OPS_SHARE = 0.08  # of the main rate
LATER_OPS_FROM = 100_000
SALE_ROUTES = {"refport": 0.5, "affixo": 0.3, "batch": 0.2}
LATER_SPACING = 4.0  # their gaps, in the main deck's: a few per seed, not one after another
# refunds, drawn from a stream of their own too: of half the sales with an invoice through
# Refport's or Affixo's route, a few seconds after the sale, in part or in full
REFUND_SHARE = 0.5
REFUNDS_FROM = 200_000
# erasures, from a stream of their own too: of some leads whose click no other lead names and
# whose customer no sale names (the checker finds an erased event by what erasure keeps), the
# customer erased a few seconds after the lead's last attempt
ERASE_SHARE = 0.3
ERASES_FROM = 300_000
# imports of history (``refstream import``), from a stream of their own too: a small file of
# two clicks, a lead naming one and a sale of its customer, dated days back, run as an
# operator runs it (again, whole, when it fails)
IMPORT_EVERY_S = (8.0, 16.0)
IMPORTS_FROM = 400_000
# do-not-track lists, a stream of their own too: a fresh visitor put on the list, then an
# Affixo click of that visitor (``on``: the listing) some seconds later, past the edges'
# refresh of the lists (REFSTREAM_SUPPRESSION_REFRESH_S): answered as usual, stored nowhere
SUPPRESS_EVERY_S = (10.0, 20.0)
SUPPRESS_AFTER_S = (6.6, 9.0)
SUPPRESSES_FROM = 500_000
# other tenants (``tenants.py``: a second workspace sharing customer and visitor ids, a third
# made and deleted) and careless input (``careless.py``: metadata at and past the JSON bound,
# the visitor "undefined"), streams of their own too
# Dub's dialect (``/track/click``, ``/track/lead``, ``/track/sale``: ``ops._dub``), a stream of
# its own too, numbered from ops.DUB_FROM: clicks (some again from the same browser), leads on
# them, sales (direct ones naming a click); careless Dub input is careless.py's own stream
DUB_SHARE = 0.1  # of the main rate
DUB_MIX = {"click": 0.36, "repeat": 0.1, "lead": 0.3, "sale": 0.24}
PARTITION_COUNTS = (1, 2, 3, 6, 8)  # what a partition-count fault changes the stage's 4 to, and back


@dataclass(frozen=True)
class Lengths:
    mode: str
    load_s: float  # how long operations are started
    rate: float  # operations per second (Poisson)
    warmup_s: float
    tail_s: float
    hold: tuple[float, float]  # a fault's duration
    every: tuple[float, float]  # from a fault's start to the next one's (shorter than a hold: they overlap)


SHORT = Lengths("short", load_s=14, rate=25, warmup_s=1.5, tail_s=1.5, hold=(1.0, 3.0), every=(0.8, 2.2))
FULL = Lengths("full", load_s=60, rate=40, warmup_s=3, tail_s=5, hold=(1.5, 10.0), every=(1.5, 6.0))


def lengths(mode: str) -> Lengths:
    return FULL if mode == "full" else SHORT


@dataclass(frozen=True)
class OpStep:
    n: int
    at: float
    kind: str
    keyed: bool
    code: int  # index into the run's link codes
    flags: frozenset[str] = frozenset()  # bot, test_mode, dedupe_body, fingerprint, item_keys; a sale's
    # route (refport, affixo) and invoice
    items: tuple[str, ...] = ()  # a batch's item types
    on: int | None = None  # a lead's click operation; stats' generate operation; a sale's lead


@dataclass(frozen=True)
class FaultStep:
    at: float
    hold: float
    kind: str
    target: str  # a role and index (worker/1), a proxy and direction (edge-redis/down), or ""
    param: float = 0.0  # clock offset, delay, partition count


@dataclass(frozen=True)
class Schedule:
    seed: int
    topology: str
    lengths: Lengths
    ops: list[OpStep] = field(default_factory=list)
    faults: list[FaultStep] = field(default_factory=list)
    placed: dict[str, str] = field(default_factory=lambda: {"a": "default", "b": "b"})  # tag -> shard at the start

    def describe(self) -> str:
        where = "  placed: " + ", ".join(f"{tag} on {shard}" for tag, shard in sorted(self.placed.items()))
        return "\n".join(
            [where]
            + [f"  {f.at:6.2f}s +{f.hold:.1f}s {f.kind} {f.target} {f.param or ''}".rstrip() for f in self.faults]
        )


def topology_of(seed: int) -> str:
    return TOPOLOGIES[seed % len(TOPOLOGIES)]


def draw(seed: int, mode: str, only: frozenset[str] = frozenset()) -> Schedule:
    """The seed's schedule; ``only``: these fault kinds and no other (to minimise a failure)."""
    rng = random.Random(seed)
    topo = topology_of(seed)
    ln = lengths(mode)
    ops, faults = _ops(rng, ln), _faults(rng, ln, topo, only, FAULTS)
    later = _faults(random.Random(f"{seed}:later"), ln, topo, only, LATER_FAULTS, spacing=LATER_SPACING)
    later += _faults(random.Random(f"{seed}:takeover"), ln, topo, only, TAKEOVER_FAULTS, spacing=TAKEOVER_SPACING)
    sharding = random.Random(f"{seed}:shards")
    first = sharding.choice(SHARDS)  # workspace a's shard; b's the other
    placed = {"a": first, "b": next(x for x in SHARDS if x != first)}
    later += _faults(sharding, ln, topo, only, SHARD_FAULTS, spacing=SHARD_SPACING)
    later_ops = _later_ops(random.Random(f"{seed}:later-ops"), ln, ops)
    refunds = _refunds(random.Random(f"{seed}:refunds"), ln, later_ops)
    erasures = _erasures(random.Random(f"{seed}:erasures"), ln, ops, later_ops)
    imports = _imports(random.Random(f"{seed}:imports"), ln)
    listed = _suppressions(random.Random(f"{seed}:suppressions"), ln)
    from . import careless, cases, tenants  # they make OpSteps of this module

    others = tenants.draw(random.Random(f"{seed}:tenants"), ln.load_s)
    others += careless.draw(random.Random(f"{seed}:careless"), ln.load_s)
    others += _dub(random.Random(f"{seed}:dub"), ln)
    others += careless.draw_dub(random.Random(f"{seed}:careless-dub"), ln.load_s)
    others += cases.draw(random.Random(f"{seed}:cases"), ln.load_s, mode)  # issue 64's five cases
    ops = sorted(ops + later_ops + refunds + erasures + imports + listed + others, key=lambda o: (o.at, o.n))
    return Schedule(seed, topo, ln, ops, sorted(faults + later, key=lambda f: f.at), placed)


def _later_ops(rng: random.Random, ln: Lengths, main: list[OpStep]) -> list[OpStep]:
    """Sales: each on an earlier lead's customer (its attribution) or a customer of its own
    (unattributed); with an invoice or not, keyed or not; one to three per batch."""
    leads = [(o.at, o.n) for o in main if o.kind == "lead"]
    out: list[OpStep] = []
    t = 0.0
    while True:
        t += rng.expovariate(ln.rate * LATER_OPS_SHARE)
        if t >= ln.load_s:
            return out
        earlier = [n for at, n in leads if at < t]
        on = rng.choice(earlier[-30:]) if earlier and rng.random() < 0.7 else None
        route = rng.choices(list(SALE_ROUTES), list(SALE_ROUTES.values()))[0]
        flags = {route} | ({"invoice"} if rng.random() < 0.6 else set())
        kind, items = ("batch", ("sale",) * rng.randint(1, 3)) if route == "batch" else ("sale", ())
        out.append(
            OpStep(
                LATER_OPS_FROM + len(out),
                t,
                kind,
                rng.random() < 0.4,
                rng.randrange(1 << 16),
                frozenset(flags),
                items,
                on,
            )
        )


def _refunds(rng: random.Random, ln: Lengths, sales: list[OpStep]) -> list[OpStep]:
    """A refund of some sales with an invoice (``on``: the sale), by ``refundId``: a third of
    the sale (``partial``) or all of it."""
    out: list[OpStep] = []
    for sale in sales:
        if sale.kind != "sale" or "invoice" not in sale.flags or rng.random() >= REFUND_SHARE:
            continue
        t = sale.at + rng.uniform(2.0, 6.0)
        flags = frozenset({"partial"} if rng.random() < 0.6 else ())
        if t < ln.load_s:
            out.append(OpStep(REFUNDS_FROM + len(out), t, "refund", False, rng.randrange(1 << 16), flags, (), sale.n))
    return out


def _erasures(rng: random.Random, ln: Lengths, main: list[OpStep], later: list[OpStep]) -> list[OpStep]:
    """``DELETE /v1/customers/{the lead's token}`` (``on``: the lead)."""
    named = Counter(o.on for o in main if (o.kind == "lead" or "lead" in o.items) and o.on is not None)
    sold = {o.on for o in later if o.on is not None}
    out: list[OpStep] = []
    for lead in main:
        if lead.kind != "lead" or lead.on is None or named[lead.on] > 1 or lead.n in sold:
            continue
        if rng.random() >= ERASE_SHARE:
            continue
        t = lead.at + rng.uniform(1.0, 5.0)
        if t < ln.load_s:
            n = ERASES_FROM + len(out)
            out.append(OpStep(n, t, "erase", False, rng.randrange(1 << 16), frozenset(), (), lead.n))
    return out


def _imports(rng: random.Random, ln: Lengths) -> list[OpStep]:
    out: list[OpStep] = []
    t = rng.uniform(*IMPORT_EVERY_S) / 2
    while t < ln.load_s:
        out.append(OpStep(IMPORTS_FROM + len(out), t, "import", False, rng.randrange(1 << 16)))
        t += rng.uniform(*IMPORT_EVERY_S)
    return out


def _suppressions(rng: random.Random, ln: Lengths) -> list[OpStep]:
    """A visitor listed, then a click of theirs (``listed``; ``on``: the listing)."""
    out: list[OpStep] = []
    t = rng.uniform(2.0, 5.0)
    while True:
        click_at = t + rng.uniform(*SUPPRESS_AFTER_S)
        if click_at >= ln.load_s:
            return out
        n = SUPPRESSES_FROM + len(out)
        out.append(OpStep(n, t, "suppress", False, rng.randrange(1 << 16)))
        out.append(OpStep(n + 1, click_at, "affixo", False, rng.randrange(1 << 16), frozenset({"listed"}), (), n))
        t += rng.uniform(*SUPPRESS_EVERY_S)


def _ops(rng: random.Random, ln: Lengths) -> list[OpStep]:
    kinds, weights = list(OP_WEIGHTS), list(OP_WEIGHTS.values())
    out: list[OpStep] = []
    clicks: list[int] = []  # ops whose answer names a click id
    generated: list[int] = []
    t = 0.0
    while True:
        t += rng.expovariate(ln.rate)
        if t >= ln.load_s:
            return out
        n = len(out)
        kind = rng.choices(kinds, weights)[0]
        if kind == "lead" and not clicks:
            kind = "affitor"
        if kind == "stats" and not generated:
            kind = "generate"
        flags: set[str] = set()
        items: tuple[str, ...] = ()
        on = None
        if kind == "biore" and rng.random() < 0.1:
            flags.add("bot")
        if kind == "affitor":
            if rng.random() < 0.05:
                flags.add("test_mode")
            if rng.random() < 0.5:
                flags.add("dedupe_body")  # the key in the body, as tracker.js sends it
        if kind == "affixo" and rng.random() < 0.2:
            flags.add("fingerprint")  # no visitor id: the edge matches or mints one
        if kind == "batch":
            items = tuple(rng.choices(("click", "conversion", "lead"), (0.6, 0.25, 0.15), k=rng.randint(1, 4)))
            if rng.random() < 0.3:
                flags.add("item_keys")
        if kind == "lead" or "lead" in items:
            on = rng.choice(clicks[-30:]) if clicks else None
            if on is None:
                items = tuple(i for i in items if i != "lead") or ("click",)
        if kind == "stats":
            on = rng.choice(generated[-10:])
        keyed = kind in KEYABLE and rng.random() < 0.5
        out.append(OpStep(n, t, kind, keyed, rng.randrange(1 << 16), frozenset(flags), items, on))
        if kind in CLICKS_WITH_IDS and "test_mode" not in flags:
            clicks.append(n)
        if kind == "generate":
            generated.append(n)


def _dub(rng: random.Random, ln: Lengths) -> list[OpStep]:
    """Dub's operations (``ops._dub``): a click (on the link with a domain, with a page
    ``url``, an ``Origin``), the same browser's click again (``repeat``; ``on``: the first),
    a lead on a click (``on``; a mode, a quantity ``qty:N``, an email; keyed or not) or a
    later lead of a lead's customer with no clickId (``follow``; ``on``: the lead), a sale
    (``direct``: a new customer's, naming a click; ``known-direct``: naming a lead's click for
    its customer; else a lead's customer's or one of its own; an invoice or not)."""
    from .ops import DUB_FROM

    kinds, weights = list(DUB_MIX), list(DUB_MIX.values())
    out: list[OpStep] = []
    clicks: list[int] = []
    leads: list[tuple[float, int]] = []
    # the leads a later lead (``follow``) or a direct sale (``known-direct``) of their customer
    # names: one each, since two of one name are one lead, whose row either may have made
    followed: set[int] = set()
    known: set[int] = set()
    t = 0.0
    while True:
        t += rng.expovariate(ln.rate * DUB_SHARE)
        if t >= ln.load_s:
            return out
        n = DUB_FROM + len(out)
        kind = rng.choices(kinds, weights)[0] if clicks else "click"
        flags: set[str] = set()
        on: int | None = None
        keyed = False
        if kind == "click":
            flags |= {f for f, p in (("domain", 0.2), ("page", 0.5), ("origin", 0.5)) if rng.random() < p}
            clicks.append(n)
        elif kind == "repeat":
            on = rng.choice(clicks[-10:])
            flags.add("repeat")
        elif kind == "lead":
            earlier = [m for at, m in leads if at < t - 3.0 and m not in followed]  # stored by now, mostly
            if earlier and rng.random() < 0.15:
                on = rng.choice(earlier[-20:])
                followed.add(on)
                flags.add("follow")
            else:
                on = rng.choice(clicks[-20:])
                flags.add(rng.choice(("async", "wait", "no-mode")))
                if rng.random() < 0.3:
                    flags.add(f"qty:{rng.randint(2, 50)}")
                if rng.random() < 0.3:
                    flags.add("email")
                keyed = rng.random() < 0.3
                leads.append((t, n))
        else:
            roll = rng.random()
            if roll < 0.4:
                on = rng.choice(clicks[-20:])
                flags.add("direct")
                if rng.random() < 0.3:
                    flags.add("lead-name")
            elif (unnamed := [m for _, m in leads[-20:] if m not in known]) and roll < 0.55:
                on = rng.choice(unnamed)
                known.add(on)
                flags.add("known-direct")
            elif leads and roll < 0.85:
                on = rng.choice(leads[-20:])[1]
            flags |= {f for f, p in (("invoice", 0.6), ("named", 0.3)) if rng.random() < p}
            keyed = rng.random() < 0.3
        kind = {"click": "dub-click", "repeat": "dub-click", "lead": "dub-lead", "sale": "dub-sale"}[kind]
        out.append(OpStep(n, t, kind, keyed, rng.randrange(1 << 16), frozenset(flags), (), on))


def _target(rng: random.Random, kind: str, topo: str) -> tuple[str, float]:
    if kind in ("process-kill", "process-stop"):
        return f"{rng.choice(ROLES)}/{rng.randrange(2)}", 0.0
    if kind == "clock-skew":
        return f"{rng.choice(ROLES)}/{rng.randrange(2)}", rng.choice(CLOCK_OFFSETS_S)
    if kind == "partition":
        return f"{rng.choice(PROXIES[topo])}/{rng.choice(('up', 'down'))}", 0.0
    if kind == "pg-slow":
        return "edge-pg+worker-pg", rng.choice((0.05, 0.15, 0.4))
    if kind == "partition-count":
        return "", float(rng.choice(PARTITION_COUNTS))
    if kind == "edge-takeover":
        return "edge/1", 0.0  # the supervised one (cluster.SUPERVISED_EDGE)
    if kind == "workspace-move":
        return rng.choice(("a", "b")), float(rng.random() < 0.5)  # the workspace; 1: --drop-old after
    if kind == "shard-outage":
        return "b", 0.0
    return "", 0.0


def _faults(
    rng: random.Random,
    ln: Lengths,
    topo: str,
    only: frozenset[str],
    table: dict[str, tuple[str, tuple[str, ...]]],
    spacing: float = 1.0,
) -> list[FaultStep]:
    kinds = sorted(k for k, (_, topos) in table.items() if topo in topos and (not only or k in only))
    if not kinds:
        return []
    deck: list[str] = []
    busy: dict[str, float] = {}  # resource -> when its fault heals
    out: list[FaultStep] = []
    t = ln.warmup_s
    while True:
        if not deck:
            deck = kinds[:]
            rng.shuffle(deck)
        kind = deck.pop()
        resource = table[kind][0]
        at = max(t, busy.get(resource, 0.0) + 0.3)
        hold = rng.uniform(*ln.hold)
        if at + hold > ln.load_s - ln.tail_s:
            return out
        target, param = _target(rng, kind, topo)
        out.append(FaultStep(round(at, 2), round(hold, 2), kind, target, param))
        busy[resource] = at + hold
        t = at + rng.uniform(*ln.every) * spacing


def seeds_from_env() -> list[int]:
    """``REFSTREAM_GEN_SEED``: a seed, or a comma-separated list of them; [] when unset."""
    return [int(s.strip(), 0) for s in os.environ.get("REFSTREAM_GEN_SEED", "").split(",") if s.strip()]


def only_from_env() -> frozenset[str]:
    """``REFSTREAM_GEN_FAULTS``: a comma-separated list of fault kinds, the only ones drawn."""
    only = frozenset(k.strip() for k in os.environ.get("REFSTREAM_GEN_FAULTS", "").split(",") if k.strip())
    if unknown := only - set(ALL_FAULTS):
        raise ValueError(f"REFSTREAM_GEN_FAULTS: no such fault kind {sorted(unknown)}; the kinds: {sorted(ALL_FAULTS)}")
    return only


def duration_from_env() -> float | None:
    """``REFSTREAM_GEN_DURATION``: 3600, 3600s, 60m or 1h; None when unset."""
    raw = os.environ.get("REFSTREAM_GEN_DURATION", "").strip().lower()
    if not raw:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", raw)
    if m is None:
        raise ValueError(f"REFSTREAM_GEN_DURATION: a duration such as 3600s, 60m or 1h, not {raw!r}")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]
