"""Seed 000's click appended in its lookup's own round trip (``ingest.edge.lookup.CHECKED_APPEND``):
once the edge has read a link, a click on it is one script that counts the limit, reads the
link and the kill switch, and appends only if they still hold what the edge read. What a
link, a kill switch or a limit says must win exactly as with a read, then an append."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from aiohttp import web

from ingest.contract import clicks, links
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge import flags
from ingest.edge.state import EDGE
from ingest.host.app import METRICS

from ._world import World, call, start_edge
from .test_e2e import TRACKED
from .test_edge import click, stream_total
from .test_seed_002_affitor import EXAMPLE, UA
from .test_store import make_links


def round_trips(runner: web.AppRunner) -> int:
    return sum(runner.app[METRICS].redis_seconds.labels().counts)


async def test_a_known_link_costs_one_round_trip(settings: Settings, redis, keys: Keys, pg):
    await make_links(pg, redis, keys, "alice")
    runner, base = await start_edge(settings)
    try:
        assert (await click(base, "alice"))[:2] == (200, TRACKED)  # reads the link: two round trips
        before = round_trips(runner)
        for _ in range(5):
            assert (await click(base, "alice"))[:2] == (200, TRACKED)
        assert round_trips(runner) - before == 5
        assert await stream_total(redis, keys) == 6
        accepted = runner.app[METRICS].accepted.labels("biore", "redis").value
        assert accepted == 6
    finally:
        await runner.cleanup()


async def test_a_link_deactivated_since_it_was_read_is_not_appended(settings: Settings, redis, keys: Keys, pg):
    await make_links(pg, redis, keys, "alice")
    runner, base = await start_edge(settings)
    try:
        assert (await click(base, "alice"))[:2] == (200, TRACKED)
        edge = runner.app[EDGE]
        link = await links.fetch(pg, "alice")
        assert link is not None and edge.seen[keys.link("alice")] is not None
        await links.put(redis, keys, dataclasses.replace(link, status="inactive", version=link.version + 1))
        # the edge still holds the active link: its guess is refused in Redis, and the click
        # is answered as one on an inactive link (the seed's 200, nothing enqueued)
        assert (await click(base, "alice"))[:2] == (200, TRACKED)
        assert await stream_total(redis, keys) == 1
        seen = links.decode(edge.seen[keys.link("alice")])
        assert isinstance(seen, links.LinkInfo) and seen.status == "inactive"
        assert (await click(base, "alice"))[:2] == (200, TRACKED)  # no guess now: read, then refused
        assert await stream_total(redis, keys) == 1
    finally:
        await runner.cleanup()


async def test_the_kill_switch_and_the_limit_win_over_what_the_edge_read(settings: Settings, redis, keys: Keys, pg):
    await make_links(pg, redis, keys, "alice")
    runner, base = await start_edge(settings.model_copy(update={"click_rate_limit_per_min": 4}))
    try:
        assert (await click(base, "alice"))[:2] == (200, TRACKED)
        await redis.set(keys.flag("referral"), flags.DISABLED)
        status, body, _ = await click(base, "alice")
        assert (status, body["error"]["code"]) == (503, "features.referral_disabled")
        await redis.delete(keys.flag("referral"))
        # the limit counted the refused request too, as a read then an append does
        statuses = [(await click(base, "alice"))[0] for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        assert await stream_total(redis, keys) == 3
    finally:
        await runner.cleanup()


async def test_seed_002_writes_its_click_cache_entry_in_the_same_script(
    settings: Settings, redis, keys: Keys, pg, world: World, drain
):
    """Affitor's click carries a write (its click id in the click cache, for the lead that
    follows): it runs in the script, after the XADD, as append would have sent it."""
    runner, base = await start_edge(settings)
    try:
        url = f"{base}/api/v1/track/click"
        first = await call("POST", url, json=EXAMPLE, headers={"User-Agent": UA})
        before = round_trips(runner)
        status, body, _ = await call("POST", url, json=EXAMPLE, headers={"User-Agent": UA})
        assert status == 200 and body["click_id"] != first[1]["click_id"]
        assert round_trips(runner) - before == 1
        cached = clicks.decode(body["click_id"], await redis.get(keys.click(body["click_id"])))
        assert cached is not None and cached.code == "PARTNER123" and cached.workspace_id == world.workspace_id
        ttl_ms = await redis.pttl(keys.click(body["click_id"]))
        assert 59 * 86400_000 < ttl_ms <= 60 * 86400_000  # the program's cookie window
        await drain()
        rows = await pg.fetch("SELECT click_id FROM events")
        assert sorted("clk_" + r["click_id"].hex for r in rows) == sorted([first[1]["click_id"], body["click_id"]])
    finally:
        await runner.cleanup()


async def test_keyed_routes_take_one_round_trip_once_warm(settings: Settings, redis, keys: Keys, world: World):
    """Seed 003 (its fingerprint remembered by the script) and seed 004 (the click and its
    link read by the script): one round trip each once the edge has read what they need."""
    runner, base = await start_edge(settings)
    auth = {"Authorization": f"Bearer {world.api_key}", "User-Agent": UA}
    try:
        click = {"ref": "PARTNER123", "visitor_id": "v_1", "fingerprint": "fp-1"}
        assert (await call("POST", f"{base}/v1/track/click", json=click, headers=auth))[0] == 200
        before = round_trips(runner)
        again = {**click, "visitor_id": "v_2"}
        status, body, _ = await call("POST", f"{base}/v1/track/click", json=again, headers=auth)
        assert (status, body["visitor_id"], body["match_method"]) == (200, "v_2", "cookie")
        assert round_trips(runner) - before == 1
        remembered = [k async for k in redis.scan_iter(match=f"{keys.prefix}:fp:*")]
        assert len(remembered) == 1 and await redis.get(remembered[0]) == b"v_1"  # NX: the first visitor stays

        clicked = await call("POST", f"{base}/api/v1/track/click", json=EXAMPLE, headers={"User-Agent": UA})
        runner.app[EDGE].seen.clear()  # as on an edge that only ever sees leads
        lead = {"clickId": clicked[1]["click_id"], "eventName": "Sign Up", "customerExternalId": "u1"}
        assert (await call("POST", f"{base}/api/track/lead", json=lead, headers=auth))[0] == 200
        before = round_trips(runner)
        status, body, _ = await call(
            "POST", f"{base}/api/track/lead", json={**lead, "customerExternalId": "u2"}, headers=auth
        )
        assert status == 200 and body["link"]["key"] == "PARTNER123" and body["customer"]["externalId"] == "u2"
        assert round_trips(runner) - before == 1
        assert await stream_total(redis, keys) == 5
    finally:
        await runner.cleanup()


@pytest.mark.once
def test_hand_built_answers_are_the_documented_models():
    """Seeds 002 and 003 dump their answers from dicts, not through their pydantic models:
    the bytes must stay the models' (the OpenAPI document is made from the models)."""
    from ingest.edge.routes.affitor import AffitorClickResponse
    from ingest.edge.routes.affixo import AffixoClickRecorded, recorded

    for visitor, method, confidence in (("v_1", "cookie", 1.0), ("v_2", "new", 0.0), ("v_3", "fingerprint", 0.8)):
        model = AffixoClickRecorded(visitor_id=visitor, match_method=method, match_confidence=confidence)
        assert recorded(visitor, method, confidence) == orjson.dumps(model.model_dump())
    assert list(AffitorClickResponse.model_fields) == ["success", "click_id", "partner_code", "cookie_window_days"]
