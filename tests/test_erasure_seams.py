"""Erasure where it meets the other writers (docs/privacy.md): the archiver, which checks the
ledger before and after each upload; a dead letter, whose lead teaches the sweep its click;
a worker that meets a late copy while a sweep runs, which leaves the erasure pending rather
than done; and a click stored hours before the lead that names it, whose archive segment
the sweep reaches. Each was a way for the person's data to stay after ``erase`` answered
(the generative test's ``erased_kept``)."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ingest.contract import clicks, wire
from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_late
from workers.archive.store import Store, open_store
from workers.ops import erasure

from ._world import World
from .test_archive import archived, run_archiver
from .test_erasure import IP, Person, archive_bytes, customer, found_in, redis_bytes

REFERRER = "https://ref.test/erasure-seams"


class Hooked:
    """An archive store that runs ``before(method)`` once, ahead of the first call of
    ``method`` (put, list): the moment a race would strike, made to strike."""

    def __init__(self, inner: Store, method: str, before: Any) -> None:
        self.inner, self.method, self.before, self.fired = inner, method, before, False
        self.url = inner.url

    async def _once(self, method: str) -> None:
        if method == self.method and not self.fired:
            self.fired = True
            await self.before()

    async def put(self, name: str, data: bytes) -> None:
        await self._once("put")
        await self.inner.put(name, data)

    async def list(self, prefix: str) -> list[str]:
        await self._once("list")
        return await self.inner.list(prefix)

    async def get(self, name: str) -> bytes:
        return await self.inner.get(name)

    def lock(self, name: str, wait_s: float) -> AbstractAsyncContextManager[None]:
        return self.inner.lock(name, wait_s)


def click_of(world: World, visitor: str, ms: int | None = None) -> Envelope:
    e = Envelope(
        EventType.CLICK,
        Dialect.AFFITOR,
        {"code": world.link["code"], "visitor_id": visitor, "referrer": REFERRER},
        world.workspace_id,
        IP,
        "Mozilla/5.0",
        event_id=uuid7(ms),
    )
    if ms is not None:
        e.received_at_ms = ms
    e.payload["click_id"] = clicks.mint(e.event_id)
    return e


def lead_of(world: World, p: Person, click: Envelope) -> Envelope:
    return Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": click.payload["visitor_id"],
            "click_id": click.payload["click_id"],
            "external_id": p.external_id,
            "email": p.email,
            "customer_name": p.name,
            "name": "Sign Up",
        },
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )


async def appended(redis: Any, keys: Keys, world: World, p: Person, visitor: str) -> Envelope:
    """A click of ``visitor`` and ``p``'s lead naming it, appended as an edge appends them
    (no ledger checked): the click."""
    click = click_of(world, visitor)
    stream = keys.stream_for(world.link["code"])
    await redis.xadd(stream, wire.to_entry_dict(click))
    await redis.xadd(stream, wire.to_entry_dict(lead_of(world, p, click)))
    return click


def needles(p: Person) -> dict[str, bytes]:
    return {**p.needles, "referrer": REFERRER.encode()}


async def in_ledger(pg: asyncpg.Pool, kind: str, value: str) -> bool:
    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
    return bool(await pg.fetchval("SELECT count(*) FROM erased_ids WHERE digest = $1", ledger.digest(key, kind, value)))


async def sweep_until_done(pg: asyncpg.Pool, redis: Any, keys: Keys, store: Store | None) -> int:
    """Sweeps until nothing is pending (each learns what it scrubs, and may leave the
    erasure pending for the next); how many it took."""
    for n in range(1, 6):
        await erasure.sweep(pg, redis, keys, store)
        if not await erasure.status(pg):
            return n
    raise AssertionError(f"still pending after 5 sweeps: {await erasure.status(pg)}")


async def test_an_archiver_writes_an_erased_persons_entries_scrubbed_and_learns_their_click(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any, tmp_path: Any
) -> None:
    """A click and a lead of an erased person reach the stream after the erasure (an edge
    checks no ledger): the archiver writes both scrubbed, the click too, which only the lead
    tells is theirs; the erasure is pending again until the sweep has removed the raw
    stream entries."""
    settings = archived(settings, tmp_path)
    store = open_store(settings)
    p = Person()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await sweep_until_done(pg, redis, keys, store)
    click = await appended(redis, keys, world, p, "v-seam-1")
    assert found_in(await redis_bytes(redis, keys), needles(p))  # the test can fail
    await run_archiver(settings, redis, store)
    assert not found_in(await archive_bytes(store, keys.prefix), needles(p))
    assert await in_ledger(pg, ledger.EVENT, click.event_id.hex)
    assert [e["pending"] for e in await erasure.status(pg)] == [["redis", "archive"]]
    await drain()
    await sweep_until_done(pg, redis, keys, store)
    assert not found_in(await redis_bytes(redis, keys), needles(p))
    row = await pg.fetchrow("SELECT ip, referrer, visitor_id FROM events WHERE event_id = $1", click.event_id)
    assert row["ip"] is None and row["referrer"] is None and ledger.is_pseudonym(row["visitor_id"])


async def test_an_erasure_committed_during_an_upload_is_met_by_the_archivers_second_look(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Any
) -> None:
    """The archiver's first look at the ledger finds nobody; the erasure commits while the
    segment uploads (an archiver stalled there, its entries acked by another meanwhile, and
    the erasure's sweep already past): its second look rewrites the segment scrubbed."""
    settings = archived(settings, tmp_path)
    p = Person()
    await appended(redis, keys, world, p, "v-seam-2")

    async def erase() -> None:
        await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)

    store = Hooked(open_store(settings), "put", erase)
    await run_archiver(settings, redis, store)  # type: ignore[arg-type]  # Hooked: a Store's stand-in
    assert store.fired
    assert not found_in(await archive_bytes(store.inner, keys.prefix), needles(p))


async def test_a_dead_lettered_lead_teaches_the_sweep_its_click(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """The person's lead is a dead letter when they are erased, and nothing of theirs is in
    Postgres but the click the lead names, stored raw: the sweep's scrub of the letter
    teaches the ledger that click, and the next sweep scrubs its row."""
    p = Person()
    click = click_of(world, "v-seam-3")
    await redis.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(click))
    await drain()
    assert await pg.fetchval("SELECT referrer FROM events WHERE event_id = $1", click.event_id) == REFERRER
    lead = lead_of(world, p, click)
    letter: dict[Any, str | bytes | int] = {  # str and bytes names, as xadd takes them
        "stream": keys.stream_for(world.link["code"]),
        "id": "1-0",
        "error": "a test's",
        "deliveries": 5,
        "at": 0,
        **wire.to_entry_dict(lead),
    }
    await redis.xadd(keys.dead, letter)
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    assert await pg.fetchval("SELECT referrer FROM events WHERE event_id = $1", click.event_id) == REFERRER
    assert await sweep_until_done(pg, redis, keys, None) >= 2  # the lesson leaves it pending once
    row = await pg.fetchrow("SELECT ip, referrer, visitor_id FROM events WHERE event_id = $1", click.event_id)
    assert row["ip"] is None and row["referrer"] is None and ledger.is_pseudonym(row["visitor_id"])
    assert not found_in(await redis_bytes(redis, keys), needles(p))


async def test_a_late_copy_met_by_a_worker_while_a_sweep_runs_leaves_the_erasure_pending(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any, tmp_path: Any
) -> None:
    """While the sweep lists the archive, a worker stores a late lead of the person naming a
    click the erasure did not know (and makes the erasure pending again): that sweep marks
    nothing done, and the next one removes the raw entries from Redis."""
    settings = archived(settings, tmp_path)
    p = Person()
    await customer(pg, world, "v-seam-4", p)
    await appended(redis, keys, world, p, "v-seam-4")
    await drain()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)

    async def worker_meets_a_late_copy() -> None:
        await appended(redis, keys, world, p, "v-seam-4b")
        await drain()

    store = Hooked(open_store(settings), "list", worker_meets_a_late_copy)
    swept = await erasure.sweep(pg, redis, keys, store)  # type: ignore[arg-type]  # Hooked: a Store's stand-in
    assert store.fired and swept.archive_done == []
    assert [e["pending"] for e in await erasure.status(pg)] == [["redis", "archive"]]
    await run_archiver(settings, redis, store.inner)
    await sweep_until_done(pg, redis, keys, store.inner)
    assert not found_in(await redis_bytes(redis, keys), needles(p))
    assert not found_in(await archive_bytes(store.inner, keys.prefix), needles(p))


async def test_the_archive_pass_starts_at_a_click_hours_before_the_late_lead_that_names_it(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any, tmp_path: Any
) -> None:
    """A click three hours back (its segment three hours back), then the person's erasure,
    then their lead naming the click, late: the erasure's archive pass begins at the click,
    not at the hour of the lead that taught the ledger it."""
    settings = archived(settings, tmp_path)
    store = open_store(settings)
    p = Person()
    stream = keys.stream_for(world.link["code"])
    now_ms = int((await redis.time())[0]) * 1000
    click = click_of(world, "v-seam-5", ms=now_ms - 3 * 3_600_000)
    await redis.xadd(stream, wire.to_entry_dict(click), id=f"{click.received_at_ms}-0")
    await drain()
    await run_archiver(settings, redis, store)
    assert found_in(await archive_bytes(store, keys.prefix), {"referrer": REFERRER.encode()})  # the test can fail
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await sweep_until_done(pg, redis, keys, store)
    await redis.xadd(stream, wire.to_entry_dict(lead_of(world, p, click)))
    await drain()
    await run_archiver(settings, redis, store)
    assert len(await store.list(keys.prefix + "/")) == 2  # two hours, two segments
    await asyncio.wait_for(sweep_until_done(pg, redis, keys, store), 60)
    assert not found_in(await archive_bytes(store, keys.prefix), needles(p))


async def test_the_sweeps_recheck_learns_the_click_of_a_raw_lead_it_scrubs(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """A raw lead row the ledger names only by its customer (stored by a batch the erasure's
    own look did not see): the re-check scrubs it and its click, and the click joins the
    ledger, so that its copies elsewhere (a stream entry, an archive line) are found too."""
    p = Person()
    click = await appended(redis, keys, world, p, "v-seam-6")
    await drain()
    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
        erasure_id = await conn.fetchval(
            "INSERT INTO erasures (id, workspace_id, subject, requested_by, archive_due, postgres_at)"
            " VALUES (gen_random_uuid(), $1, $2, 'test', now() + interval '30 days', now()) RETURNING id",
            world.workspace_id,
            ledger.digest(key, ledger.EXTERNAL, p.external_id, world.workspace_id),
        )
        await conn.execute(
            "INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id) VALUES ($1, $2, 'x', $3)",
            ledger.digest(key, ledger.EXTERNAL, p.external_id, world.workspace_id),
            erasure_id,
            world.workspace_id,
        )
    assert not await in_ledger(pg, ledger.EVENT, click.event_id.hex)
    assert await erasure_late.recheck(pg, key, world.workspace_id, datetime.now(UTC) - timedelta(hours=1)) >= 1
    assert await in_ledger(pg, ledger.EVENT, click.event_id.hex)
    row = await pg.fetchrow("SELECT ip, referrer, visitor_id FROM events WHERE event_id = $1", click.event_id)
    assert row["ip"] is None and row["referrer"] is None and ledger.is_pseudonym(row["visitor_id"])


async def test_a_ledger_hold_whose_connection_is_cut_is_unavailable_not_an_error(
    settings: Settings, pg: asyncpg.Pool
) -> None:
    """A spool's drain holds the ledger in a transaction; Postgres ending that session (a
    restart, a failover) fails its commit with the driver's InterfaceError: the drain must
    take it for "Postgres away" and wait, as it does for a refused connect (CI's hour run
    logged ``spool.drain_failed`` with a traceback here)."""
    own = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        with pytest.raises(ledger.LedgerUnavailable):
            async with ledger.held(own) as check:
                assert await check([]) == {}
                ended = await pg.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
                )
                assert ended == 1
    finally:
        await own.close()


async def test_a_sweep_at_replicas_1_marks_redis_done_only_once_a_replica_holds_its_deletes(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """At ``replicas:1`` the sweep's deletes and rewrites in Redis count once a replica holds
    them: a failover onto one that lacks them would bring the person back, with the erasure
    marked done (the generative test's seed 1029314941). This Redis has no replica: the
    sweep deletes, says why it cannot mark Redis done, and the erasure stays pending."""
    p = Person()
    await appended(redis, keys, world, p, "v-seam-8")
    await drain()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    assert await redis.info("replication") and (await redis.info("replication"))["connected_slaves"] == 0
    swept = await erasure.sweep(pg, redis, keys, None, replicas=1, wait_ms=50)
    assert swept.entries_deleted >= 2 and swept.redis_done == [] and swept.archive_done == []
    assert [e["pending"] for e in await erasure.status(pg)] == [["redis", "archive"]]
    assert not found_in(await redis_bytes(redis, keys), needles(p))  # deleted all the same
    assert await sweep_until_done(pg, redis, keys, None) == 1  # at the primary level: done
