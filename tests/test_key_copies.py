"""Two copies of one keyed event reach the workers (docs/guarantees.md, *Copies of one
key*): the lowest event id holds the key's row, and the other is filed as a copy of it, so
the id an answer named stands for the stored row (``ingest.contract.copies``)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from ingest.contract import clicks, copies
from ingest.contract.events import EventType
from ingest.contract.keys import Keys
from workers.consumer import store

from ._world import World, call
from .test_erasure import erase_key
from .test_race_erased_click import keyed_copy
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead, lead_body


async def _rows(pg: asyncpg.Pool, *ids: uuid.UUID) -> set[uuid.UUID]:
    return {r["event_id"] for r in await pg.fetch("SELECT event_id FROM events WHERE event_id = ANY($1::uuid[])", ids)}


async def _stored_as(pg: asyncpg.Pool, world: World, *ids: uuid.UUID) -> dict[uuid.UUID, uuid.UUID]:
    async with pg.acquire() as conn:
        return await copies.stored_as(conn, world.workspace_id, int(EventType.CLICK), ids)


async def test_a_copy_stored_by_a_later_batch_is_filed_as_the_stored_ones(world: World, pg: asyncpg.Pool) -> None:
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    first, later = sorted((keyed_copy(world, dedupe), keyed_copy(world, dedupe)), key=lambda e: e.event_id.int)
    await store.write_batch(pg, [first])
    await store.write_batch(pg, [later])
    assert await _rows(pg, first.event_id, later.event_id) == {first.event_id}
    assert await _stored_as(pg, world, first.event_id, later.event_id) == {later.event_id: first.event_id}


async def test_copies_in_one_batch_and_a_lower_copy_arriving_last(world: World, pg: asyncpg.Pool) -> None:
    """In one batch the lowest id takes the key and the others are its copies; a copy stored
    first keeps the key against a lower id that arrives later, which is filed as its copy."""
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    a, b, c = sorted((keyed_copy(world, dedupe) for _ in range(3)), key=lambda e: e.event_id.int)
    await store.write_batch(pg, [c, b])
    await store.write_batch(pg, [a])
    assert await _rows(pg, a.event_id, b.event_id, c.event_id) == {b.event_id}
    assert await _stored_as(pg, world, a.event_id, b.event_id, c.event_id) == {
        a.event_id: b.event_id,
        c.event_id: b.event_id,
    }


async def test_a_redelivered_copy_files_nothing(world: World, pg: asyncpg.Pool) -> None:
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    e = keyed_copy(world, dedupe)
    await store.write_batch(pg, [e])
    await store.write_batch(pg, [e])
    assert await _stored_as(pg, world, e.event_id) == {}
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM event_dedupe WHERE dedupe_key LIKE 'copy:%' AND event_id = $1", e.event_id
        )
        == 0
    )


async def test_an_answer_naming_the_copy_a_lost_record_let_in_stands_for_the_stored_row(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """The race behind the generative test's seeds 493051949 and 1246373390, made to happen:
    a keyed Affitor click is stored, its key's record is lost (as a Redis failover loses an
    unreplicated write: deleted here), and the client's retry is appended again and answered
    200 with another click id. The workers keep one row; the id the retry's answer named is
    filed as a copy of it, a lead on that click is attributed, and erasing the lead's
    customer scrubs the stored row."""
    headers = {"Idempotency-Key": f"k-{uuid.uuid4().hex[:8]}"}
    status, first, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, headers=headers)
    assert status == 200, first
    await drain()
    records = [k async for k in redis.scan_iter(match=f"{keys.prefix}:idk:*")]
    assert records, "the key's record"
    await redis.delete(*records)  # the failover's loss
    status, again, replayed = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, headers=headers)
    assert status == 200 and "Idempotent-Replayed" not in replayed and again["click_id"] != first["click_id"], again
    await drain()
    stored, named = (clicks.parse(first["click_id"]), clicks.parse(again["click_id"]))
    assert stored is not None and named is not None
    assert await _rows(pg, stored, named) == {stored}
    assert await _stored_as(pg, world, named) == {named: stored}

    customer = f"cust-{uuid.uuid4().hex[:8]}"
    status, out, _ = await lead(edge, world.api_key, lead_body(again["click_id"], customerExternalId=customer))
    assert status == 200, out
    await drain()
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{customer}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out
    row = await pg.fetchrow("SELECT ip, referrer, user_agent, agent_id FROM events WHERE event_id = $1", stored)
    assert row is not None and set(row.values()) == {None}, dict(row)
