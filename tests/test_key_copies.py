"""Two copies of one keyed event reach the workers (docs/guarantees.md, *Copies of one
key*): the lowest event id holds the key's row, and the other is filed as a copy of it, so
the id an answer named stands for the stored row (``ingest.contract.copies``)."""

from __future__ import annotations

import uuid

import asyncpg

from ingest.contract import copies
from ingest.contract.events import EventType
from workers.consumer import store

from ._world import World
from .test_race_erased_click import keyed_copy


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
