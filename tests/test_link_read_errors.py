"""A link or key whose cache read fails is never read as "no such code" (or "no such key").

On a Redis Cluster the node that holds a link's entry can be failing over while the one
that holds ``links:warm`` answers: the pipeline's reply for the link is an error, beside a
warm cache. Here the error is a real Redis's own (WRONGTYPE: the entry's key holds a hash),
in the same place of the same replies. Before, the edge read it as an unknown code: bio.re
answered 200 and stored nothing, Affixo 404, Affitor 400. Now the link comes from Postgres
and the event is appended."""

from __future__ import annotations

from ingest.contract.keys import Keys

from ._world import World, call
from .test_e2e import TRACKED
from .test_edge import click as biore_click
from .test_edge import stream_total
from .test_seed_002_affitor import EXAMPLE as AFFITOR
from .test_seed_003_affixo import click as affixo_click


async def _break(redis, keys: Keys, code: str) -> None:
    await redis.set(keys.links_warm, b"1")  # warm: a miss would mean "no such code"
    await redis.delete(keys.link(code))
    await redis.hset(keys.link(code), "not", "a string")  # GET answers WRONGTYPE in the link's slot


async def test_a_link_entry_that_cannot_be_read_is_looked_up_not_refused(edge: str, world: World, redis, keys: Keys):
    code = world.link["code"]
    await _break(redis, keys, code)

    assert (await biore_click(edge, code))[:2] == (200, TRACKED)
    assert await stream_total(redis, keys) == 1  # stored: before, a 200 that appended nothing

    status, out, _ = await affixo_click(edge, world.api_key, {"ref": code, "visitor_id": "v1"})
    assert (status, out["ok"]) == (200, True)  # before: 404 link_not_found
    assert await stream_total(redis, keys) == 2

    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=AFFITOR)
    assert (status, out["success"]) == (200, True), out  # before: 400 "No referral link found"
    assert await stream_total(redis, keys) == 3
    assert await redis.type(keys.link(code)) == b"hash"  # the edge wrote nothing over it


async def test_an_unknown_code_is_still_unknown_beside_the_error(edge: str, world: World, redis, keys: Keys):
    await _break(redis, keys, "nosuchcode")
    assert (await biore_click(edge, "nosuchcode"))[:2] == (200, TRACKED)  # bio.re's answer for any code
    status, out, _ = await affixo_click(edge, world.api_key, {"ref": "nosuchcode", "visitor_id": "v1"})
    assert (status, out) == (404, {"error": "link_not_found"})  # Postgres says so, not the error
    assert await stream_total(redis, keys) == 0
