"""How long each fault lasts: ``REFSTREAM_FAULTS=short`` (the default, for the main suite:
the whole directory in a few minutes on a 2-core machine) or ``full`` (scripts/faults)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    mode: str
    rate: float  # steady load, requests per second
    warmup_s: float  # load before the fault
    tail_s: float  # load after the fault ends (recovery is measured from the fault's end)
    pg_down_s: float
    pg_restarts: int  # `restart -m immediate` in the middle of batches, this many times
    read_only_s: float
    storm_s: float  # SIGKILL a random worker every 2-5 s for this long
    redis_full_s: float
    lagging_load_s: float
    sigterm_backlog: int  # events waiting when the worker that gets SIGTERM starts
    poison_load_s: float
    milestone_rounds: int
    milestone_affiliates: int
    recover_s: float = 30.0  # the bound: drained within this of the fault's end
    drain_timeout_s: float = 120.0  # a bound on waiting, past which the scenario fails with what is left
    redis_down_s: float = 6.0  # Redis killed (and restarted from its AOF) after this long
    blackhole_s: float = 6.0  # Redis behind a proxy that swallows every byte


SHORT = Plan(
    mode="short",
    rate=80,
    warmup_s=2,
    tail_s=1,
    pg_down_s=10,
    pg_restarts=2,
    read_only_s=8,
    storm_s=20,
    redis_full_s=8,
    lagging_load_s=10,
    sigterm_backlog=1500,
    poison_load_s=6,
    milestone_rounds=3,
    milestone_affiliates=30,
    drain_timeout_s=60,
)
FULL = Plan(
    mode="full",
    rate=150,
    warmup_s=5,
    tail_s=5,
    pg_down_s=60,
    pg_restarts=5,
    read_only_s=30,
    storm_s=60,
    redis_full_s=30,
    lagging_load_s=40,
    sigterm_backlog=5000,
    poison_load_s=20,
    milestone_rounds=10,
    milestone_affiliates=60,
    redis_down_s=30,
    blackhole_s=30,
)


def plan() -> Plan:
    mode = os.environ.get("REFSTREAM_FAULTS", "short")
    if mode not in ("short", "full"):
        raise ValueError(f"REFSTREAM_FAULTS must be short or full, not {mode!r}")
    return FULL if mode == "full" else SHORT
