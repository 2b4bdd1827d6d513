"""The batch transaction under races it must not lose: duplicates inside one batch,
milestones crossed by two batches at once, crossing duplicate leads, and customers that
do not depend on how events were grouped into batches.

Races are forced, not hoped for: a transaction is held open while the other runs, and the
test waits until Postgres reports the other backend waiting on a lock (or finished).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from ingest.contract.clock import now_ms as clock_now_ms
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from ingest.manage import admin
from workers.consumer.store import BatchResult, _write, write_batch

from ._world import World

_GATE = 0x7465_7374_6761_7465  # "testgate": the advisory lock the gate trigger waits on


async def _second_link(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, code: str, *, own: bool) -> str:
    """Another link in the world's workspace: the world's affiliate's, or a new affiliate's."""
    async with pg.acquire() as conn:
        affiliate = world.affiliate_id
        if own:
            affiliate = str(
                await conn.fetchval(
                    "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1, $2, $3) RETURNING id",
                    world.workspace_id,
                    world.program_id,
                    code,
                )
            )
        await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=world.workspace_id,
            code=code,
            program_id=world.program_id,
            affiliate_id=affiliate,
        )
    return affiliate


def _conversion(world: World, code: str, session: str) -> Envelope:
    return Envelope(
        type=EventType.CONVERSION,
        dialect=Dialect.BRICQS,
        workspace_id=world.workspace_id,
        payload={"code": code, "dedupe": f"{code}:{session}", "conversion_id": f"conv_{session}"},
    )


async def _until_waiting(pg: asyncpg.Pool, pids: Sequence[int], tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Until every backend in ``pids`` waits on a lock, or a task has finished (nothing blocked it)."""
    for _ in range(2000):
        if any(t.done() for t in tasks):
            return
        waiting = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND wait_event_type = 'Lock'", list(pids)
        )
        if waiting == len(pids):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the transactions never reached the interleaving point")


async def test_a_batch_holding_an_event_twice_stores_it_once(pg: asyncpg.Pool, world: World):
    e, f = (
        Envelope(type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": "PARTNER123"}, ip="203.0.113.7")
        for _ in range(2)
    )
    result = await write_batch(pg, [e, replace(e), f])  # a requeued or spooled copy of e beside e
    assert (result.inserted, result.duplicates) == (2, 1)
    assert await pg.fetchval("SELECT count(*) FROM events") == 2
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 2
    assert await pg.fetchval("SELECT sum(clicks) FROM daily_stats") == 2
    again = await write_batch(pg, [f, e, f])
    assert (again.inserted, again.duplicates) == (0, 3)


async def test_two_batches_converting_on_two_links_of_one_affiliate_reach_a_milestone_once(
    pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
):
    await _second_link(pg, redis, keys, world, "SECOND", own=False)
    await pg.execute("INSERT INTO milestones (program_id, name, threshold) VALUES ($1, 'Two', 2)", world.program_id)
    async with pg.acquire() as first, pg.acquire() as second:
        one, two = first.transaction(), second.transaction()
        await one.start()
        await two.start()
        try:
            # the first batch is in, uncommitted: one conversion, below the threshold
            assert (await _write(first, [_conversion(world, "PARTNER123", "s1")], None)).milestones == 0
            # the second converts on another link of the same affiliate while the first is open
            task = asyncio.create_task(_write(second, [_conversion(world, "SECOND", "s2")], None))
            await _until_waiting(pg, [second.get_server_pid()], [task])
            await one.commit()
            reached = await asyncio.wait_for(task, 10)
            await two.commit()
        finally:
            for tx, conn in ((one, first), (two, second)):
                if conn.is_in_transaction():
                    await tx.rollback()
    assert reached.milestones == 1
    assert await pg.fetchval("SELECT sum(conversions) FROM links WHERE affiliate_id = $1", world.affiliate_id) == 2
    assert await pg.fetchval("SELECT count(*) FROM affiliate_milestones") == 1


async def test_crossing_duplicate_leads_never_deadlock(pg: asyncpg.Pool, world: World):
    # a gate in front of Y and X': a batch reaching one stops there until the test opens it
    await pg.execute(f"""
        CREATE OR REPLACE FUNCTION test_store_exact_gate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared({_GATE}); RETURN NEW; END $$;
        CREATE TRIGGER test_store_exact_gate BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.payload ? 'gate') EXECUTE FUNCTION test_store_exact_gate();
    """)

    def lead(event_id: UUID, customer: str, gate: bool) -> Envelope:
        payload = {"code": "PARTNER123", "external_id": customer, "name": "Sign Up", **({"gate": 1} if gate else {})}
        return Envelope(
            type=EventType.LEAD,
            dialect=Dialect.REFPORT,
            workspace_id=world.workspace_id,
            payload=payload,
            event_id=event_id,
        )

    async def attempt(conn: asyncpg.Connection, batch: list[Envelope]) -> BatchResult:
        async with conn.transaction():  # no in-place retry: a deadlock would surface here
            return await _write(conn, batch, None)

    rounds = 30
    try:
        async with pg.acquire() as gate, pg.acquire() as a, pg.acquire() as b:
            for i in range(rounds):
                id1, id2, id3, id4 = sorted(uuid7() for _ in range(4))
                x, y = f"x{i}", f"y{i}"
                # A = [X, Y], B = [Y', X']: in event-id order each holds the key the other needs next
                batch_a = [lead(id1, x, False), lead(id3, y, True)]
                batch_b = [lead(id2, y, False), lead(id4, x, True)]
                await gate.execute("SELECT pg_advisory_lock($1)", _GATE)
                tasks = [asyncio.create_task(attempt(a, batch_a)), asyncio.create_task(attempt(b, batch_b))]
                try:
                    await _until_waiting(pg, [a.get_server_pid(), b.get_server_pid()], tasks)
                finally:
                    await gate.execute("SELECT pg_advisory_unlock($1)", _GATE)
                results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
                errors = [r for r in results if isinstance(r, BaseException)]
                assert not errors, f"round {i}: {errors!r}"
                assert sum(r.inserted for r in results if isinstance(r, BatchResult)) == 2
    finally:
        await pg.execute(
            "DROP TRIGGER IF EXISTS test_store_exact_gate ON events; DROP FUNCTION IF EXISTS test_store_exact_gate()"
        )
    keys = await pg.fetch("SELECT dedupe_key, count(*) AS n FROM events GROUP BY dedupe_key")
    assert len(keys) == 2 * rounds and {r["n"] for r in keys} == {1}
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'PARTNER123'") == 2 * rounds


_CUSTOMER_TYPES = (EventType.CLICK, EventType.LEAD, EventType.CONVERSION)  # what a customer is made of (not sales)
_CONTACT = {"external_id": "external_id", "email": "email", "name": "customer_name", "avatar_url": "avatar"}


def _journey(rng: random.Random, world: World, seed: int) -> list[Envelope]:
    """Events of one visitor on two links, with few distinct times so that ties are common."""
    base = 1_750_000_000_000 + seed * 10_000_000
    events = []
    for i in range(rng.randint(2, 9)):
        ms = base + rng.randint(0, 3) * 1000
        etype = rng.choice(_CUSTOMER_TYPES)
        payload: dict[str, Any] = {"code": rng.choice(["PARTNER123", "OTHER"]), "visitor_id": "vis"}
        for key in _CONTACT.values():
            if rng.random() < 0.4:
                payload[key] = f"{key}-{rng.randint(1, 3)}"
        if etype is EventType.LEAD:
            payload["name"] = f"step {i}"  # each lead its own dedupe key: none is a repeat
        elif etype is EventType.CONVERSION:
            payload["dedupe"] = f"s{seed}-{i}"
        # the UUIDv7 of its own received time, random within the millisecond: ids break ties
        events.append(
            Envelope(
                type=etype,
                dialect=Dialect.NATIVE,
                workspace_id=world.workspace_id,
                payload=payload,
                event_id=uuid7(ms),
                received_at_ms=ms,
            )
        )
    return events


def _groupings(rng: random.Random, events: list[Envelope]) -> list[list[list[Envelope]]]:
    """The same events as one batch, one batch each (newest first), and random batches."""
    out = [[list(events)], [[e] for e in sorted(events, key=lambda e: e.event_id, reverse=True)]]
    for _ in range(3):
        shuffled = rng.sample(events, len(events))
        cuts = sorted(rng.sample(range(1, len(events)), rng.randint(0, len(events) - 1)))
        out.append([shuffled[i:j] for i, j in zip([0, *cuts], [*cuts, len(events)], strict=True)])
    return out


async def test_customers_are_the_same_however_events_are_batched(
    pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
):
    other_affiliate = await _second_link(pg, redis, keys, world, "OTHER", own=True)
    links = {r["code"]: r["id"] for r in await pg.fetch("SELECT code, id FROM links")}
    for seed in range(15):
        rng = random.Random(seed)
        events = _journey(rng, world, seed)
        rows = []
        for grouping in _groupings(rng, events):
            await pg.execute(
                "DELETE FROM events; DELETE FROM event_dedupe; DELETE FROM customers; DELETE FROM link_visitor_days"
            )
            for batch in grouping:
                await write_batch(pg, batch)
            row = dict(await pg.fetchrow("SELECT * FROM customers"))
            row.pop("id")
            rows.append(row)
        assert all(r == rows[0] for r in rows), f"seed {seed}: {rows}"

        # and each field is what the events say, not just the same every time
        def order(e: Envelope) -> tuple[int, UUID]:
            return e.received_at_ms, e.event_id

        got = rows[0]
        for column, key in _CONTACT.items():
            carriers = [e for e in events if key in e.payload]
            assert got[column] == (max(carriers, key=order).payload[key] if carriers else None), (seed, column)
        first = min(events, key=order)
        assert got["link_id"] == links[first.payload["code"]]
        assert str(got["affiliate_id"]) == (
            world.affiliate_id if first.payload["code"] == "PARTNER123" else other_affiliate
        )
        first_clicks = [e.event_id for e in events if e.type is EventType.CLICK]
        assert got["first_click_id"] == (min(first_clicks) if first_clicks else None)
        assert got["status"] == max(int(e.type) for e in events)


async def test_a_batchs_counters_lock_visitors_then_links_then_days(pg: asyncpg.Pool, world: World):
    """The counters are one statement of three writes (``workers.consumer.counters``): a
    batch waiting on a link's lock has its visitor rows in already, and has not yet
    touched the link's daily row, the lock order every batch keeps."""
    link_id = world.link["id"]
    now = clock_now_ms()

    def click(visitor: str) -> Envelope:
        payload = {"code": "PARTNER123", "visitor_id": visitor}
        return Envelope(type=EventType.CLICK, dialect=Dialect.NATIVE, payload=payload, received_at_ms=now)

    await write_batch(pg, [click("v-first")])  # the link's daily row exists: the batch below updates it
    day = await pg.fetchval("SELECT day FROM daily_stats WHERE link_id = $1", link_id)
    async with pg.acquire() as holder, pg.acquire() as batch, pg.acquire() as probe:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM links WHERE id = $1 FOR NO KEY UPDATE", link_id)

        async def write() -> BatchResult:
            async with batch.transaction():
                return await _write(batch, [click("v-second")], None)

        task = asyncio.create_task(write())
        try:
            await _until_waiting(pg, [batch.get_server_pid()], [task])
            assert not task.done(), "the batch did not wait for the link's lock"
            await probe.execute("SET lock_timeout = '300ms'")
            # its first visit is in, uncommitted: the same key waits for it
            with pytest.raises(asyncpg.LockNotAvailableError):
                await probe.execute(
                    "INSERT INTO link_visitor_days (link_id, day, visitor_key) VALUES ($1, $2, 'v-second')"
                    " ON CONFLICT DO NOTHING",
                    link_id,
                    day,
                )
            # and the day's row is not locked yet
            assert (
                await probe.execute(
                    "UPDATE daily_stats SET clicks = clicks WHERE link_id = $1 AND day = $2", link_id, day
                )
                == "UPDATE 1"
            )
        finally:
            await held.rollback()
        result = await asyncio.wait_for(task, 10)
    assert result.inserted == 1
    row = await pg.fetchrow("SELECT clicks, unique_clicks FROM links WHERE id = $1", link_id)
    assert (row["clicks"], row["unique_clicks"]) == (2, 2)
    daily = await pg.fetchrow("SELECT clicks, unique_clicks FROM daily_stats WHERE link_id = $1", link_id)
    assert (daily["clicks"], daily["unique_clicks"]) == (2, 2)
