"""The do-not-track list (docs/privacy.md): a listed address, customer or visitor is
answered as usual on every tracking route, appended nowhere, and counted only as a
``suppressed`` drop; the list keeps no value; taken off the list, they are tracked again."""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge.state import EDGE
from workers.consumer import drops

from ._world import World, call, start_edge
from .conftest import wait_for
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead_body

LISTED_IP = "127.0.0.77"


async def stream_entries(redis: Any, keys: Keys) -> int:
    return sum([await redis.xlen(s) for s in keys.streams])


async def test_a_listed_address_customer_and_visitor_are_answered_and_stored_nowhere(
    settings: Settings, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    runner, edge = await start_edge(settings.model_copy(update={"suppression_refresh_s": 0.1}))
    state = runner.app[EDGE]
    auth = {"Authorization": f"Bearer {world.api_key}"}
    try:
        # a click to lead from, tracked (its address is not listed)
        status, tracked, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK)
        assert status == 200
        made = []
        for kind, value in (("ip", LISTED_IP), ("customer", "cust-private"), ("visitor", "v-private")):
            status, out, _ = await call(
                "POST", f"{edge}/v1/suppressions", json={"kind": kind, "value": value}, headers=auth
            )
            assert status == 201 and out["kind"] == kind, out
            made.append(out["id"])
        await wait_for(lambda: _listed(state, world.workspace_id, 3), what="the edge reading the list")
        before = await stream_entries(redis, keys)

        # each answered as its route answers, none appended
        status, click, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, source_ip=LISTED_IP)
        assert status == 200 and click["success"] is True and click["click_id"].startswith("clk_")
        lead = lead_body(tracked["click_id"], customerExternalId="cust-private")
        status, answer, _ = await call("POST", f"{edge}/api/track/lead", json=lead, headers=auth)
        assert status == 200 and answer["customer"]["externalId"] == "cust-private"
        items = [
            {"type": "click", "ref": "PARTNER123", "visitor_id": "v-private"},
            {"type": "click", "ref": "PARTNER123", "visitor_id": "v-tracked"},
        ]
        status, batch, _ = await call("POST", f"{edge}/v1/events/batch", json=items, headers=auth)
        assert status == 200 and [r["ok"] for r in batch["results"]] == [True, True]
        assert await stream_entries(redis, keys) == before + 1  # the tracked batch item alone

        await drain()
        await state.drops.close()  # what the edge tallied, sent to Redis
        await drops.fold(redis, pg, keys.prefix)
        assert await pg.fetchval("SELECT sum(n) FROM drop_stats WHERE reason = 'suppressed'") == 3
        assert await pg.fetchval("SELECT count(*) FROM events WHERE host(ip) = $1", LISTED_IP) == 0
        assert await pg.fetchval("SELECT count(*) FROM events WHERE visitor_id = 'v-private'") == 0
        assert await pg.fetchval("SELECT count(*) FROM events WHERE type = 2") == 0
        assert await pg.fetchval("SELECT count(*) FROM events WHERE visitor_id = 'v-tracked'") == 1

        # the list holds no value; an entry taken off is tracked again
        status, listing, _ = await call("GET", f"{edge}/v1/suppressions", headers=auth)
        assert status == 200 and sorted(e["id"] for e in listing["data"]) == sorted(made)
        assert not any(v in str(listing) for v in (LISTED_IP, "cust-private", "v-private"))
        assert not await pg.fetchval(
            "SELECT count(*) FROM suppressions WHERE encode(digest, 'escape') LIKE '%private%'"
        )
        status, _, _ = await call("DELETE", f"{edge}/v1/suppressions/{made[0]}", headers=auth)
        assert status == 204
        status, out, _ = await call("DELETE", f"{edge}/v1/suppressions/{made[0]}", headers=auth)
        assert (status, out["error"]) == (404, "not_found")
        await wait_for(lambda: _listed(state, world.workspace_id, 2), what="the edge reading the shorter list")
        status, _, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, source_ip=LISTED_IP)
        assert status == 200
        assert await stream_entries(redis, keys) == before + 2
    finally:
        await runner.cleanup()


async def test_a_suppression_is_refused_in_the_apis_shape_when_malformed(edge: str, world: World) -> None:
    auth = {"Authorization": f"Bearer {world.api_key}"}
    for body in ({"kind": "email", "value": "x"}, {"kind": "ip"}, {"kind": "ip", "value": ""}, [1]):
        status, out, _ = await call("POST", f"{edge}/v1/suppressions", json=body, headers=auth)
        assert status == 400 and "error" in out, (body, status, out)


async def _listed(state: Any, workspace_id: str, n: int) -> bool:
    return len(state.suppress.lists.get(workspace_id, ())) == n
