"""A retried request counts once (docs/guarantees.md): every keyed write route answers a
repeat of its idempotency key as it answered the first copy, and stores one event; copies
in flight at once too; another key counts again, as does the same key after the window;
a malformed key is a 400 and a reused one a 422, each in the route's own error shape."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._world import World, call, start_edge
from .conftest import wait_for
from .test_seed_002_affitor import EXAMPLE as AFFITOR_CLICK


def bearer(key: str, idem: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **({"Idempotency-Key": idem} if idem is not None else {})}


async def first_click_id(edge: str) -> str:
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=AFFITOR_CLICK)
    assert status == 200, out
    return str(out["click_id"])


def requests(edge: str, world: World, click_id: str, key: str) -> dict[str, tuple[str, str, Any, dict[str, str]]]:
    """One keyed request per event route: (method, url, body, headers)."""
    return {
        "affixo": (
            "POST",
            f"{edge}/v1/track/click",
            {"ref": "PARTNER123", "url": "https://a.test/"},
            bearer(world.api_key, key),
        ),
        "refport": (
            "POST",
            f"{edge}/api/track/lead",
            {"clickId": click_id, "eventName": f"Sign Up {key}", "customerExternalId": f"u-{key}"},
            bearer(world.api_key, key),
        ),
        "affitor-header": ("POST", f"{edge}/api/v1/track/click", AFFITOR_CLICK, {"Idempotency-Key": key}),
        "affitor-dedupe": ("POST", f"{edge}/api/v1/track/click", {**AFFITOR_CLICK, "dedupe": f"d-{key}"}, {}),
        "biore": ("POST", f"{edge}/api/v1/referral/click/PARTNER123", None, {"Idempotency-Key": key}),
        "batch": (
            "POST",
            f"{edge}/v1/events/batch",
            [
                {"type": "click", "ref": "PARTNER123", "visitor_id": "v1"},
                {"type": "conversion", "code": "PARTNER123", "referred_session_id": f"s-{key}"},
            ],
            bearer(world.api_key, key),
        ),
    }


async def send(req: tuple[str, str, Any, dict[str, str]]) -> tuple[int, Any, dict[str, str]]:
    method, url, body, headers = req
    return await call(method, url, json=body, headers=headers)


async def events(pg: asyncpg.Pool) -> dict[str, int]:
    rows = await pg.fetch("SELECT dialect, count(*) AS n FROM events GROUP BY 1")
    return {r["dialect"]: r["n"] for r in rows}


async def test_each_route_answers_a_repeat_as_the_first_and_stores_one_event(
    edge: str, world: World, pg: asyncpg.Pool, drain: Any
):
    click_id = await first_click_id(edge)
    for name, req in requests(edge, world, click_id, "key-1").items():
        status, body, headers = await send(req)
        assert status == 200, (name, body)
        assert "Idempotent-Replayed" not in headers
        again = await send(req)
        assert again[:2] == (status, body), name  # the same minted ids: click, event, visitor
        assert again[2].get("Idempotent-Replayed") == "true", name
    await drain()
    # one Affitor click before the keyed ones; each keyed request once (the batch: 2 items)
    assert await events(pg) == {"affitor": 3, "affixo": 1, "refport": 1, "biore": 1, "native": 2}
    link = await pg.fetchrow("SELECT clicks, leads, conversions FROM links WHERE code = 'PARTNER123'")
    assert tuple(link) == (6, 1, 1)


async def test_copies_in_flight_at_once_count_once(edge: str, world: World, pg: asyncpg.Pool, drain: Any):
    click_id = await first_click_id(edge)
    reqs = requests(edge, world, click_id, "together")
    answers = await asyncio.gather(*(send(req) for req in reqs.values() for _ in range(8)))
    for i, name in enumerate(reqs):
        mine = answers[i * 8 : i * 8 + 8]
        assert {a[0] for a in mine} == {200}, (name, mine[0])
        assert all(a[1] == mine[0][1] for a in mine), name
        assert sum(a[2].get("Idempotent-Replayed") == "true" for a in mine) == 7, name
    await drain()
    assert await events(pg) == {"affitor": 3, "affixo": 1, "refport": 1, "biore": 1, "native": 2}


async def test_another_key_counts_again(edge: str, world: World, pg: asyncpg.Pool, drain: Any):
    click_id = await first_click_id(edge)
    one = requests(edge, world, click_id, "one")
    two = requests(edge, world, click_id, "two")
    for name in ("affixo", "affitor-header", "affitor-dedupe", "biore"):
        a, b = await send(one[name]), await send(two[name])
        assert a[0] == b[0] == 200
        assert "Idempotent-Replayed" not in b[2]
        if name != "biore":  # bio.re answers the same body to every click
            assert a[1] != b[1], name
    await drain()
    assert await events(pg) == {"affitor": 5, "affixo": 2, "biore": 2}


async def test_the_same_key_after_the_window_is_a_new_request(
    settings: Settings, world: World, redis: Any, pg: asyncpg.Pool, drain: Any
):
    short = settings.model_copy(update={"idempotency_window_s": 3})  # the repeat within it under load too
    runner, edge = await start_edge(short)
    try:
        req = requests(edge, world, "", "short-lived")["affixo"]
        first = await send(req)
        assert (await send(req))[1] == first[1]  # within the window

        async def forgotten() -> bool:
            return not [k async for k in redis.scan_iter(match=f"{settings.stream_prefix}:idk:*")]

        await wait_for(forgotten, timeout=15, what="the key's record to expire with its window")
        later = await send(req)
        assert later[0] == 200 and later[1]["visitor_id"] != first[1]["visitor_id"]
        assert "Idempotent-Replayed" not in later[2]
    finally:
        await runner.cleanup()
    await drain()
    assert await events(pg) == {"affixo": 2}


BAD_KEYS = ["", "x" * 256, "clé", "tab\there"]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=["empty", "256-chars", "non-ascii", "control"])
async def test_a_malformed_key_is_a_400_in_each_routes_shape(edge: str, world: World, bad: str, pg: asyncpg.Pool):
    h = bearer(world.api_key, bad)
    cases = [
        (f"{edge}/v1/track/click", {"ref": "PARTNER123"}, h, {"error": "invalid_idempotency_key"}),
        (
            f"{edge}/api/track/lead",
            {"clickId": "clk_x", "eventName": "e", "customerExternalId": "c"},
            h,
            {"error": {"code": "VALIDATION_ERROR"}},
        ),
        (f"{edge}/v1/events/batch", [{"type": "click", "ref": "PARTNER123"}], h, {"error": "invalid_idempotency_key"}),
        (f"{edge}/v1/programs", {"name": "P"}, h, {"error": "invalid_idempotency_key"}),
        (f"{edge}/api/v1/track/click", AFFITOR_CLICK, {"Idempotency-Key": bad}, {"success": False}),
        (
            f"{edge}/api/v1/referral/click/PARTNER123",
            None,
            {"Idempotency-Key": bad},
            {"success": False, "error": {"statusCode": 400, "code": "validation.idempotency_key"}},
        ),
    ]
    for url, body, headers, shape in cases:
        status, out, _ = await call("POST", url, json=body, headers=headers)
        assert status == 400, (url, out)
        assert _contains(out, shape), (url, out)
    # tracker.js's body field, and a batch item's own key: the same rule
    if bad:
        status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json={**AFFITOR_CLICK, "dedupe": bad})
        assert status == 400 and out["success"] is False, out
        items = [{"type": "click", "ref": "PARTNER123", "idempotency_key": bad}]
        status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=items, headers=bearer(world.api_key))
        assert status == 200 and out["results"][0]["error"] == "invalid", out
    assert await pg.fetchval("SELECT count(*) FROM programs WHERE name = 'P'") == 0


def _contains(out: Any, shape: Any) -> bool:
    if isinstance(shape, dict):
        return isinstance(out, dict) and all(k in out and _contains(out[k], v) for k, v in shape.items())
    return bool(out == shape)


async def test_a_key_reused_for_another_request_is_a_422(edge: str, world: World, pg: asyncpg.Pool, drain: Any):
    click_id = await first_click_id(edge)
    h = bearer(world.api_key, "reused")
    cases = [
        (
            f"{edge}/v1/track/click",
            {"ref": "PARTNER123", "url": "https://a.test/1"},
            {"ref": "PARTNER123", "url": "https://a.test/2"},
            h,
            {"error": "idempotency_key_reused"},
        ),
        (
            f"{edge}/api/track/lead",
            {"clickId": click_id, "eventName": "A", "customerExternalId": "c"},
            {"clickId": click_id, "eventName": "B", "customerExternalId": "c"},
            h,
            {"error": {"code": "IDEMPOTENCY_KEY_REUSED"}},
        ),
        (
            f"{edge}/api/v1/track/click",
            {**AFFITOR_CLICK, "dedupe": "d"},
            {**AFFITOR_CLICK, "dedupe": "d", "page_title": "Another page"},
            {},
            {"success": False},
        ),
        (f"{edge}/v1/programs", {"name": "P1"}, {"name": "P2"}, h, {"error": "idempotency_key_reused"}),
    ]
    for url, body, other, headers, shape in cases:
        assert (await call("POST", url, json=body, headers=headers))[0] in (200, 201), url
        status, out, _ = await call("POST", url, json=other, headers=headers)
        assert status == 422 and _contains(out, shape), (url, out)
    await drain()
    assert await events(pg) == {"affitor": 2, "affixo": 1, "refport": 1}
    assert [r["name"] for r in await pg.fetch("SELECT name FROM programs WHERE name LIKE 'P_'")] == ["P1"]


async def test_batch_item_keys(edge: str, world: World, pg: asyncpg.Pool, drain: Any):
    h = bearer(world.api_key)
    a = {"type": "click", "ref": "PARTNER123", "visitor_id": "va", "idempotency_key": "item-a"}
    b = {"type": "click", "ref": "PARTNER123", "visitor_id": "vb", "idempotency_key": "item-b"}
    other_a = {**a, "visitor_id": "not-va"}
    plain = {"type": "click", "ref": "PARTNER123", "visitor_id": "vp"}
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", json=[a, b, a, other_a, plain], headers=h)
    r = out["results"]
    assert status == 200 and (out["accepted"], out["rejected"]) == (4, 1), out
    assert r[2] == {**r[0], "index": 2}  # repeated inside the batch: answered as its first
    assert r[3]["error"] == "idempotency_key_reused"
    # the retry of the whole batch: keyed items as first answered, the unkeyed one again
    status, again, _ = await call("POST", f"{edge}/v1/events/batch", json=[a, b, a, other_a, plain], headers=h)
    assert [x for x in again["results"][:4]] == r[:4]
    assert again["results"][4]["event_id"] != r[4]["event_id"]
    # an item's key is its own, wherever it stands in a batch
    status, moved, _ = await call("POST", f"{edge}/v1/events/batch", json=[plain, b], headers=h)
    assert moved["results"][1] == {**r[1], "index": 1}
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE visitor_id IN ('va', 'vb')") == 2
    assert await pg.fetchval("SELECT count(*) FROM events WHERE visitor_id = 'vp'") == 3


async def test_management_writes(edge: str, world: World, pg: asyncpg.Pool, redis: Any, settings: Settings):
    h = bearer(world.api_key, "mgmt-1")
    program = await call("POST", f"{edge}/v1/programs", json={"name": "Spring"}, headers=h)
    assert program[0] == 201
    again = await call("POST", f"{edge}/v1/programs", json={"name": "Spring"}, headers=h)
    assert again[:2] == program[:2] and again[2]["Idempotent-Replayed"] == "true"
    assert await pg.fetchval("SELECT count(*) FROM programs WHERE name = 'Spring'") == 1

    # concurrent copies of a create: one row, one answer
    h2 = bearer(world.api_key, "mgmt-2")
    body = {"affiliate_id": world.affiliate_id, "url": "https://yoursite.com/x"}
    answers = await asyncio.gather(*(call("POST", f"{edge}/v1/links", json=body, headers=h2) for _ in range(6)))
    assert {a[0] for a in answers} == {201} and len({orjson.dumps(a[1]) for a in answers}) == 1, answers
    assert await pg.fetchval("SELECT count(*) FROM links WHERE url = 'https://yoursite.com/x'") == 1

    # a created API key is replayed to the retry (it was its answer), never stored in clear
    h3 = bearer(world.api_key, "mgmt-3")
    made = await call("POST", f"{edge}/v1/keys", json={"scopes": ["read"]}, headers=h3)
    assert made[0] == 201
    assert (await call("POST", f"{edge}/v1/keys", json={"scopes": ["read"]}, headers=h3))[1] == made[1]
    assert await pg.fetchval("SELECT count(*) FROM api_keys WHERE workspace_id = $1", world.workspace_id) == 2
    stored = [await redis.get(k) async for k in redis.scan_iter(match=f"{settings.stream_prefix}:idk:*")]
    assert stored and not any(made[1]["api_key"].encode() in v for v in stored)

    # a revocation retried: the first answer, not a 404
    h4 = bearer(world.api_key, "mgmt-4")
    revoked = await call("DELETE", f"{edge}/v1/keys/{made[1]['prefix']}", headers=h4)
    assert (
        revoked[0] == 200
        and (await call("DELETE", f"{edge}/v1/keys/{made[1]['prefix']}", headers=h4))[:2] == (revoked[:2])
    )

    # a refused request is not remembered: once fixed (the affiliate exists), the key runs
    h5 = bearer(world.api_key, "mgmt-5")
    ghost = {"affiliate_id": "00000000-0000-0000-0000-000000000000", "url": "https://yoursite.com/y"}
    assert (await call("POST", f"{edge}/v1/links", json=ghost, headers=h5))[0] == 404
    assert (await call("POST", f"{edge}/v1/links", json=ghost, headers=h5))[0] == 404


async def test_bricqs_generate_honours_the_key(edge: str, world: World):
    headers = {"X-API-Key": world.api_key, "Idempotency-Key": "gen-1"}
    body = {"participant_id": "p1", "campaign_id": world.program_id}
    first = await call("POST", f"{edge}/api/v1/referrals/generate", json=body, headers=headers)
    assert first[0] == 200, first
    again = await call("POST", f"{edge}/api/v1/referrals/generate", json=body, headers=headers)
    assert again[:2] == first[:2] and again[2]["Idempotent-Replayed"] == "true"
    other = await call(
        "POST", f"{edge}/api/v1/referrals/generate", json={**body, "participant_id": "p2"}, headers=headers
    )
    assert other[0] == 422 and other[1]["error"] == "idempotency_key_reused" and other[1]["message"]
    bad = await call("POST", f"{edge}/api/v1/referrals/generate", json=body, headers={**headers, "Idempotency-Key": ""})
    assert bad[0] == 400 and bad[1]["error"] == "validation_error"


@given(
    prefix=st.sampled_from(["rs", "rstest:ab12:3", "a:idk:b"]),
    digest=st.text("0123456789abcdef", min_size=32, max_size=32),
    partition=st.none() | st.integers(0, 1023),
    workspace=st.none() | st.uuids().map(str),
)
def test_a_record_names_its_partition_and_workspace_as_made(prefix, digest, partition, workspace) -> None:
    record = Keys(prefix, 4).idempotent(digest, partition, workspace)
    assert Keys.record_workspace(record) == workspace
    assert Keys.record_partition(record) == partition
    assert record.endswith(digest)
