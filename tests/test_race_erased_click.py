"""Issue 64's open ``erased_kept`` (generative seed 1246373390): an erased customer's lead named
a keyed Affitor click, and the click stayed raw. The interleavings here are forced by calling
the workers' store path (``workers.consumer.store.write_batch``) and the erasure
(``ingest.privacy.erasure.erase``) in the order that would break: the lead stored, the
customer erased, and only then the click, spooled while Redis was full, stored; each copy
of a keyed click (one ``Idempotency-Key`` / ``dedupe``, several event ids) in either order.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from ingest.contract import clicks
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.privacy import erasure as pg_erasure
from workers.consumer import store

from ._world import World
from .test_erasure import IP, Person

REFERRER = "https://ref.test/race-erased-click"


def keyed_copy(world: World, dedupe: str) -> Envelope:
    """One copy of a keyed Affitor click, as the edge makes it (its own event and click id;
    its key's dedupe value shared with the key's other copies)."""
    e = Envelope(
        EventType.CLICK,
        Dialect.AFFITOR,
        {"code": world.link["code"], "referrer": REFERRER, "dedupe": dedupe},
        world.workspace_id,
        IP,
        "Mozilla/5.0",
        event_id=uuid7(),
    )
    e.payload["click_id"] = e.payload["visitor_id"] = clicks.mint(e.event_id)
    return e


def lead_on(world: World, p: Person, click: Envelope) -> Envelope:
    return Envelope(
        EventType.LEAD,
        Dialect.AFFITOR,
        {
            "code": world.link["code"],
            "click_id": click.payload["click_id"],
            "visitor_id": click.payload["visitor_id"],
            "external_id": p.external_id,
            "email": p.email,
            "name": "Sign Up",
        },
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )


async def raw_rows(pg: asyncpg.Pool, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    rows = await pg.fetch("SELECT event_id, referrer FROM events WHERE event_id = ANY($1::uuid[])", ids)
    return {r["event_id"]: r["referrer"] for r in rows}


async def test_a_click_stored_after_its_leads_erasure_is_stored_scrubbed(world: World, pg: asyncpg.Pool) -> None:
    """The named copy arrives after the erasure (spooled while Redis was full, drained late):
    the store path finds its id in the ledger (the lead taught it) and scrubs it."""
    p = Person()
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    named = keyed_copy(world, dedupe)
    assert (await store.write_batch(pg, [lead_on(world, p, named)])).inserted == 1
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await store.write_batch(pg, [named])
    assert await raw_rows(pg, [named.event_id]) == {named.event_id: None}


async def test_the_named_copy_wins_its_key_in_a_batch_after_the_erasure(world: World, pg: asyncpg.Pool) -> None:
    """Two copies of one keyed click, the answered (named) one minted later, both stored after
    the erasure in one batch: the row of the key holds no referrer, whichever copy it is."""
    p = Person()
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    # attempt 1 (503 "may be stored", spooled) and a later one (200, its click id the
    # lead's): the earlier minted, the lower id (two ids of one millisecond: put in order)
    spooled, named = sorted((keyed_copy(world, dedupe), keyed_copy(world, dedupe)), key=lambda e: e.event_id.int)
    assert (await store.write_batch(pg, [lead_on(world, p, named)])).inserted == 1
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await store.write_batch(pg, [named, spooled])
    rows = await raw_rows(pg, [spooled.event_id, named.event_id])
    assert len(rows) == 1, rows  # one row per key
    assert set(rows.values()) == {None}, rows  # and it is not the person's raw click


async def test_a_copy_stored_before_the_named_one_after_the_erasure(world: World, pg: asyncpg.Pool) -> None:
    """The spooled copy (the lower event id) in a batch of its own after the erasure, the named
    copy later: the key's row holds no referrer."""
    p = Person()
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    spooled, named = sorted((keyed_copy(world, dedupe), keyed_copy(world, dedupe)), key=lambda e: e.event_id.int)
    assert (await store.write_batch(pg, [lead_on(world, p, named)])).inserted == 1
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await store.write_batch(pg, [spooled])
    await store.write_batch(pg, [named])
    rows = await raw_rows(pg, [spooled.event_id, named.event_id])
    assert set(rows.values()) <= {None}, rows


async def test_both_copies_stored_before_the_erasure(world: World, pg: asyncpg.Pool) -> None:
    """Both copies stored before the erasure, the spooled one (the lower id) holding the key's
    row and the named one a duplicate of it (filed as its copy: ``ingest.contract.copies``):
    the erasure of the lead's customer leaves the key's row holding no referrer."""
    p = Person()
    dedupe = f"idem:{uuid.uuid4().hex}:1"
    spooled, named = sorted((keyed_copy(world, dedupe), keyed_copy(world, dedupe)), key=lambda e: e.event_id.int)
    await store.write_batch(pg, [spooled])
    await store.write_batch(pg, [named])
    assert (await store.write_batch(pg, [lead_on(world, p, named)])).inserted == 1
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    rows = await raw_rows(pg, [spooled.event_id, named.event_id])
    assert set(rows.values()) <= {None}, rows
