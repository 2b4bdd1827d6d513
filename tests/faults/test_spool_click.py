"""A Refport lead naming a click that still waits in an edge's spool: the lead gets a
retryable answer (503 with Retry-After, in Refport's error shape), never the permanent
``400 INVALID_CLICK_ID``; once the spool drains (the click's cache entry with it), the same
lead succeeds and resolves to that click. Both events are stored exactly once (I1-I3)."""

from __future__ import annotations

import asyncio

import pytest

from .._world import BROWSER, call
from ._plan import Plan
from ._spool import durable_redis, edges, redis_down, redis_up
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_spool_lead_on_a_spooled_click(private_fault_redis, make_stage, plan: Plan):
    server = await durable_redis(private_fault_redis)
    stage: Stage = make_stage(server.url)
    world = await stage.prepare(workers=1)
    (first,) = edges(stage)
    first.terminate()
    await asyncio.to_thread(first.wait, 30)
    # this edge keeps the click in its spool (it drains once an hour); the one that answers
    # the lead has a spool of its own (empty)
    holding = await stage.start_edge(REFSTREAM_SPOOL_DRAIN_EVERY_S="3600")
    holder = stage.procs.running[-1]
    answering = await stage.start_edge(REFSTREAM_SPOOL_DIR=str(stage.tmp / "other-spool"))

    redis_down(server)
    code = world.codes[0]
    body = {"affiliate_url": f"https://shop.test/landing?aff={code}"}
    status, out, _ = await call("POST", f"{holding}/api/v1/track/click", json=body, headers={"User-Agent": BROWSER})
    assert status == 200 and out["success"] is True, out
    click_id = out["click_id"]
    await redis_up(server)
    fault_end = await stage.fault_over()

    lead = {"clickId": click_id, "eventName": "Sign Up", "customerExternalId": "lead-on-spooled-click"}
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    for _ in range(3):  # while the click is in the spool: retryable, every time
        status, out, headers = await call("POST", f"{answering}/api/track/lead", json=lead, headers=bearer)
        assert (status, out["error"]["code"]) == (503, "SERVICE_UNAVAILABLE"), out
        assert headers.get("Retry-After")

    # the holding edge restarts with the usual drain interval: the click and its cache entry drain
    holder.terminate()
    await asyncio.to_thread(holder.wait, 30)
    await stage.start_edge()  # the same spool directory as the holding edge
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, out, _ = await call("POST", f"{answering}/api/track/lead", json=lead, headers=bearer)
        if status != 503 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200, out
    assert out["click"]["id"] == click_id and out["link"]["key"] == code
    accepted = {click_id.removeprefix("clk_"): "affitor", lead["customerExternalId"]: "lead"}
    await stage.finish("spool: a lead on a spooled click", accepted, fault_end=fault_end, refused=3)
