"""Redis frozen (SIGSTOP) under load on every event route (the five dialects, the batch
route, the redirect, Refport's sale and Affixo's conversion), then resumed (SIGCONT): 5 s in
short mode; 5, 15 and 25 s in full mode.

A frozen Redis is the nastiest outage for a client: the kernel still completes handshakes
into its listen backlog, so connects succeed and writes land, and at SIGCONT the server
reads and runs everything it was sent, on every socket, the edge's abandoned ones included,
and answers it. Replies then arrive for round trips the edge gave up on. Checked: every
answer echoes its own request (``_echo.py``: ids and values each request carries or was
given), nothing but a 503 among the 5xx, no 4xx to a valid request, and after the drain
I1-I3: every event answered 2xx stored exactly once (Affixo's by their visitor ids), the
counters equal their rows, nothing pending."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ._echo import EchoLoad, misattributed, sales_stored_once
from ._plan import Plan
from ._plan import plan as _plan
from ._servers import FaultRedis
from ._stage import Stage, codes_covering

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

STALLS_S = (5.0,) if _plan().mode == "short" else (5.0, 15.0, 25.0)


@contextmanager
def frozen(server: FaultRedis) -> Iterator[None]:
    """The server SIGSTOPped inside the block, SIGCONTed however it ends."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def stored_once(stage: Stage, visitors: set[str]) -> list[str]:
    """Every accepted Affixo click stored exactly once, found by the visitor id it sent."""
    rows = await stage.check.fetch("SELECT visitor_id, count(*) AS n FROM events WHERE dialect = 'affixo' GROUP BY 1")
    counts = {r["visitor_id"]: r["n"] for r in rows}
    missing = [v for v in visitors if v not in counts]
    twice = {v: n for v, n in counts.items() if n > 1}
    problems = []
    if missing:
        problems.append(f"I1: {len(missing)} accepted Affixo clicks not stored, e.g. {missing[:3]}")
    if twice:
        problems.append(f"I1: {len(twice)} Affixo clicks stored more than once, e.g. {list(twice.items())[:3]}")
    return problems


@pytest.mark.parametrize("stall_s", STALLS_S, ids=lambda s: f"{s:.0f}s")
async def test_redis_stalled_under_load_on_every_route(private_fault_redis, make_stage, plan: Plan, stall_s: float):
    server: FaultRedis = await private_fault_redis()
    stage: Stage = make_stage(server.url)
    # a dozen links: a link resolved from another request's reply is most likely another one
    world = await stage.prepare(workers=2, codes=codes_covering(stage.keys, per_partition=3))
    assert world.api_key
    async with EchoLoad(stage.base, world.codes, rate=plan.rate, api_key=world.api_key) as load:
        await asyncio.sleep(plan.warmup_s)  # load before the fault: nothing to await in it
        await stage.storing()
        with frozen(server):
            stalled_at = time.monotonic()
            await asyncio.sleep(stall_s)  # the fault, held
        fault_end = await stage.fault_over()
        await asyncio.sleep(plan.tail_s)
    record = load.record
    during = {k: n for k, n in record.statuses.items() if n}
    print(
        f"\nanswers: {dict(sorted(during.items()))}; shed {record.shed};"
        f" {sum(1 for at, *_ in record.answers if at >= stalled_at)} sent from the stall on"
    )
    figures = await stage.finish(
        f"redis stalled {stall_s:.0f}s",
        record.accepted,
        fault_end=fault_end,
        refused=record.refused(),
        problems=load.problems(),
    )
    # drained by now: the Affixo clicks, which MARKER_SQL finds by event id, by their visitor ids
    assert not (affixo := await stored_once(stage, load.affixo)), affixo
    assert not (elsewhere := await misattributed(stage.check, load.code_of)), elsewhere
    assert not (sales := await sales_stored_once(stage.check, load)), sales
    kinds = set(record.accepted.values()) | ({"affixo"} if load.affixo else set()) | ({"sale"} if load.sales else set())
    routes = {"biore", "affitor", "lead", "convert", "affixo", "batch", "redirect", "sale"}
    assert kinds == routes, f"routes never accepted: {routes - kinds}"
    assert figures.accepted
