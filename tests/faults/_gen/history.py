"""The recorded history of one seed's run: every operation with each of its attempts (which
edge, when, what was sent and what came back) and every fault with when it started and when
it was healed. The checker judges this history against the final state, nothing else.

An attempt's outcome is one of:
- ``ok``: a 2xx (or a redirect carrying a click id): accepted, so stored exactly once;
- ``refused``: an answer the README calls a refusal (4xx, 503, a redirect without a click
  id): never stored;
- ``unknown``: no answer (a client timeout, a connection cut) or an answer the edge marks
  "may be stored" (``ops.MAY_BE_STORED``): stored at most once, or not at all;
- ``error``: a 5xx other than the documented 503s (an anomaly by itself; its effect unknown).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("ok", "refused", "unknown", "error")


@dataclass
class Attempt:
    edge: str
    at: float  # seconds since the run's start
    took: float | None = None
    status: int | None = None
    error: str | None = None  # why no answer came (exception name)
    body: Any = None  # the parsed JSON answer (a redirect: its Location)
    headers: dict[str, str] = field(default_factory=dict)  # the few the checker reads
    outcome: str = "unknown"
    items: list[str] = field(default_factory=list)  # a batch: each item's outcome

    def line(self) -> str:
        answer = f"{self.status}" if self.status is not None else f"no answer ({self.error})"
        return f"t={self.at:.2f}s {self.edge} -> {answer} [{self.outcome}] {str(self.body)[:160]}"


@dataclass
class Unit:
    """One event an operation may store, found in Postgres by its ``token``."""

    token: str
    kind: str  # click, lead, conversion, sale
    code: str | None  # the link the event must be on (None: a lead's click decides)
    once: bool  # an idempotency key or a natural key: at most one row whatever the retries
    expect: dict[str, Any] = field(default_factory=dict)  # what its row must hold (click_id, visitor_id, user_agent)
    listed_by: int | None = None  # the operation that put its visitor on the do-not-track list
    listed: str = ""  # the value listed, where that operation listed many (``cases.py``)
    name: str | None = None  # a lead's event name: its rows are its token's of this name (one customer, many leads)
    never: str = ""  # stored by no answer (a deferred lead): the anomaly a row of it is
    maybe: bool = False  # stored once at most, or not at all, whatever the answers (a known customer's direct lead)


@dataclass
class Op:
    n: int
    kind: str
    token: str
    key: str | None  # the Idempotency-Key (header, or Affitor's ``dedupe``; a sale's invoice), same on every retry
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    units: list[Unit]
    echo: dict[str, Any] = field(default_factory=dict)  # what its answer must echo
    attempts: list[Attempt] = field(default_factory=list)
    skipped: str | None = None  # not sent, and why

    def outcomes(self) -> Counter[str]:
        return Counter(a.outcome for a in self.attempts)

    def unit_outcomes(self, index: int) -> list[tuple[str, Attempt]]:
        """(outcome, attempt) of unit ``index`` in each attempt (a batch's item, else the attempt's)."""
        return [(a.items[index] if a.items else a.outcome, a) for a in self.attempts]

    def describe(self) -> str:
        sent = f"{self.method} {self.path} key={self.key!r} body={str(self.body)[:200]}"
        return f"op {self.n} {self.kind} {self.token}: {sent}\n      " + "\n      ".join(
            a.line() for a in self.attempts
        )


@dataclass
class FaultRecord:
    kind: str
    target: str
    started: float
    healed: float | None = None
    note: str = ""

    def line(self) -> str:
        healed = f"{self.healed:.2f}" if self.healed is not None else "never"
        return f"{self.kind}({self.target}) {self.started:.2f}s..{healed}s {self.note}".rstrip()


class History:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.t0 = time.monotonic()
        self.ops: dict[int, Op] = {}  # by number (a lead is made once its click is done: out of order)
        self.faults: list[FaultRecord] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def op(self, n: int) -> Op | None:
        return self.ops.get(n)

    def ops_by_kind(self) -> Counter[str]:
        return Counter(o.kind for o in self.ops.values() if o.skipped is None)

    def attempts_by_outcome(self) -> Counter[str]:
        return Counter(a.outcome for o in self.ops.values() for a in o.attempts)

    def faults_by_kind(self) -> Counter[str]:
        return Counter(f.kind for f in self.faults)

    def faults_around(self, at: float, slack: float = 1.0) -> list[str]:
        """The faults under way near ``at`` (for an anomaly's description)."""
        return [
            f.line()
            for f in self.faults
            if f.started - slack <= at <= (f.healed if f.healed is not None else 1e9) + slack
        ]

    def dump(self) -> str:
        """The whole history as text, for a failing seed's kept directory."""
        lines = [f"seed {self.seed}", "faults:"] + ["  " + f.line() for f in self.faults] + ["operations:"]
        lines += [
            "  " + (o.describe() if o.skipped is None else f"op {o.n} {o.kind} skipped: {o.skipped}")
            for _, o in sorted(self.ops.items())
        ]
        return "\n".join(lines) + "\n"
