"""Clients retry under load: every request is sent twice with its idempotency key, to two
edges behind one Redis (as a load balancer would spread a retry), half of the pairs at once
and half after the first copy answered. Each key is stored once: I1-I3 hold, both copies
of a pair answer the same ids, and the events stored are exactly the distinct keys."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from .._world import BROWSER
from ._load import Record, referer_marker
from ._plan import Plan
from ._stage import EDGE_ENV, Stage, World

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

MIX = {"biore": 0.4, "affitor": 0.3, "lead": 0.15, "batch": 0.15}
Markers = Callable[[Any], list[str]]


class Retries:
    """An open-loop load of request pairs; ``record`` holds the markers of what was accepted."""

    def __init__(self, bases: list[str], world: World, *, rate: float, seed: int = 7) -> None:
        self.bases = bases
        self.world = world
        self.rate = rate
        self.rng = random.Random(seed)
        self.record = Record()
        self.problems: list[str] = []
        self.keys = 0  # distinct keys of which some copy was accepted
        self.clicks: list[str] = []  # accepted Affitor click ids, for leads
        self.http: aiohttp.ClientSession | None = None

    async def run(self, seconds: float) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        tasks: list[asyncio.Task[None]] = []
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                kind = self.rng.choices(list(MIX), list(MIX.values()))[0]
                tasks.append(asyncio.create_task(self.pair(kind)))
                await asyncio.sleep(1 / self.rate)  # the load's pace, not a synchronisation
            await asyncio.gather(*tasks)
        finally:
            await self.http.close()

    def request(self, kind: str) -> tuple[str, str, Any, dict[str, str], Markers]:
        """(kind, path, body, headers, the markers of an answer); a lead needs a click first."""
        key = uuid.uuid4().hex
        code = self.rng.choice(self.world.codes)
        auth = {"Authorization": f"Bearer {self.world.api_key}", "Idempotency-Key": key}
        if kind == "biore":
            marker = referer_marker()
            headers = {"Referer": marker, "User-Agent": BROWSER, "Idempotency-Key": key}
            return kind, f"/api/v1/referral/click/{code}", None, headers, lambda out: [marker]
        if kind == "lead" and self.clicks:
            marker = f"lead-{key}"
            body = {"clickId": self.clicks.pop(), "eventName": "Sign Up", "customerExternalId": marker}
            return kind, "/api/track/lead", body, auth, lambda out: [marker]
        if kind == "batch":
            items: list[dict[str, Any]] = [
                {"type": "click", "ref": self.rng.choice(self.world.codes), "visitor_id": f"v{i}-{key}"}
                for i in range(3)
            ]
            items[0]["idempotency_key"] = f"own-{key}"  # an item's own key beside the request's
            return (
                kind,
                "/v1/events/batch",
                items,
                auth,
                lambda out: [r["event_id"].replace("-", "") for r in out["results"] if r["ok"]],
            )
        body = {"affiliate_url": f"https://shop.test/landing?aff={code}", "dedupe": key}
        return (
            "affitor",
            "/api/v1/track/click",
            body,
            {"User-Agent": BROWSER},
            lambda out: [out["click_id"].removeprefix("clk_")] if out.get("success") else [],
        )

    async def send(self, kind: str, base: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        assert self.http is not None
        try:
            async with self.http.post(base + path, json=body, headers=headers) as r:
                raw = await r.read()
                self.record.statuses[f"{kind} {r.status}"] += 1
                return orjson.loads(raw) if 200 <= r.status < 300 else None
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.record.statuses[f"{kind} {type(exc).__name__}"] += 1
            return None

    async def pair(self, kind: str) -> None:
        kind, path, body, headers, markers = self.request(kind)
        a, b = self.rng.sample(self.bases, 2) if len(self.bases) > 1 else self.bases * 2
        if self.rng.random() < 0.5:
            answers = await asyncio.gather(
                self.send(kind, a, path, body, headers), self.send(kind, b, path, body, headers)
            )
        else:
            answers = (await self.send(kind, a, path, body, headers), await self.send(kind, b, path, body, headers))
        got = [sorted(markers(out)) for out in answers if out is not None]
        if len(got) == 2 and got[0] != got[1]:
            self.problems.append(f"{kind}: the two copies answered {got[0]} and {got[1]}")
        accepted = {m for g in got for m in g}
        if accepted:
            self.keys += len(accepted)
        for m in accepted:
            self.record.attempted.add(m)
            self.record.accept(kind, m)
        if kind == "affitor" and accepted:
            self.clicks.append("clk_" + next(iter(accepted)))


async def test_every_request_sent_twice_counts_once(stage: Stage, plan: Plan):
    world = await stage.prepare(workers=2)
    second = await stage.procs.start_edge(**EDGE_ENV)
    load = Retries([stage.base, second], world, rate=plan.rate / 2)
    seconds = 6.0 if plan.mode == "short" else 40.0
    await load.run(seconds)
    fault_end = await stage.fault_over()
    figures = await stage.finish(
        f"client retries {seconds:.0f}s ({load.keys} keys, each sent twice)",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=load.problems,
    )
    assert figures.extras == 0, figures.line(plan.mode)
    assert await stage.check.event_count() == load.keys == len(load.record.accepted)
    assert load.record.statuses, "no request sent"
