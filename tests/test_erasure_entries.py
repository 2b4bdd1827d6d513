"""An erased person's click with two stream entries in two partitions (docs/privacy.md, *An
erasure*): the edge appended it under one partition count, and a copy (a spool's resend,
an append whose outcome was unknown) went under the next one, to its code's partition
then. Both are near the click's time. The workers store one and file what they see as a
copy (``ingest.contract.erasure_index``); the sweep finds the other by the click's time.
After the lead that names the click is erased and the sweep is done, no stream entry holds
the click's referrer (the generative test's ``erased_kept``, "a click's stream entry":
seeds 124262877, 597311485, 1732886679, 1194045669, each of which changed the partition
count while it ran).

Real Redis and Postgres; the worker's pipeline is driven batch by batch, as its consumer
would read them (``XREADGROUP``), so the order of the stores is the test's."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import pytest

from ingest.contract import clicks, clock, wire
from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.ledger import placement
from ingest.privacy import erasure as pg_erasure
from workers.consumer.pipeline import Batch, Pipeline
from workers.ops import erasure

from ._world import World
from .conftest import wait_for
from .test_erasure import IP, Person

UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0"


def _click(world: World, referrer: str) -> Envelope:
    e = Envelope(EventType.CLICK, Dialect.AFFITOR, {}, world.workspace_id, IP, UA)
    click_id = clicks.mint(e.event_id)
    e.payload.update({"code": world.link["code"], "click_id": click_id, "visitor_id": click_id, "referrer": referrer})
    return e


def _lead(world: World, click: Envelope, p: Person) -> Envelope:
    payload = {
        "code": world.link["code"],
        "click_id": click.payload["click_id"],
        "visitor_id": click.payload["visitor_id"],
        "name": "Sign Up",
        "external_id": p.external_id,
        "email": p.email,
    }
    return Envelope(EventType.LEAD, Dialect.REFPORT, payload, world.workspace_id, IP, UA)


async def _read(redis: Any, keys: Keys, p: int, envelopes: list[Envelope]) -> Batch:
    """``envelopes`` appended to partition ``p`` and read by the workers' group, as a
    consumer reads a batch."""
    stream = keys.stream(p)
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except Exception as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    for e in envelopes:
        await redis.xadd(stream, wire.to_entry_dict(e))
    read = await redis.xreadgroup(GROUP, "test", {stream: ">"})
    entries = [(sid, fields) for _, page in read for sid, fields in page]
    assert len(entries) == len(envelopes), entries
    return Batch(p, stream, entries)


async def _holding(redis: Any, keys: Keys, needle: bytes) -> list[str]:
    """The stream entries, of every partition the test wrote, that hold ``needle``."""
    out = []
    for p in range(keys.partitions):
        for sid, fields in await redis.xrange(keys.stream(p)):
            if any(needle in v for v in fields.values()):
                out.append(f"{keys.stream(p)} {sid!r}")
    return out


async def _erased_and_swept(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, p: Person) -> None:
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)

    async def swept() -> bool:
        await erasure.sweep(pg, redis, keys, None)
        return not [e for e in await erasure.status(pg) if "redis" in e["pending"]]

    await wait_for(swept, what="Redis done for the erasure")


async def test_a_clicks_stored_entry_in_its_old_partition_is_swept_beside_its_copy_in_its_new_one(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """The entry the workers stored first is in a partition of the old count; its copy,
    in the code's partition now (where the sweep reads first), is filed as a copy. The
    sweep found the copy by the click's time and stopped there: the stored entry kept the
    referrer, and Redis was marked done."""
    pipeline = Pipeline(settings, redis, pg)
    p, referrer = Person(), f"https://ref.test/{secrets.token_hex(4)}"
    click = _click(world, referrer)
    now = keys.partition_for(world.link["code"])
    then = next(q for q in range(keys.partitions) if q != now)
    first = await _read(redis, keys, then, [click])
    await pipeline.process(first)
    copy = await _read(redis, keys, now, [click])
    await pipeline.process(copy)
    assert copy.result is not None and copy.result.copies == {click.event_id}, copy.result  # the test can fail
    lead = await _read(redis, keys, now, [_lead(world, click, p)])
    await pipeline.process(lead)
    assert len(await _holding(redis, keys, referrer.encode())) == 2

    await _erased_and_swept(pg, redis, keys, world, p)
    assert await pg.fetchval("SELECT referrer FROM events WHERE event_id = $1", click.event_id) is None
    assert await _holding(redis, keys, referrer.encode()) == []


async def test_a_click_and_its_copy_stored_in_one_shared_transaction_are_both_swept(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """The two partitions' small batches, each with an entry of the click, stored together
    in one transaction (``workers.consumer.combine``): the store keeps one row of the
    event, and neither batch saw a copy, so neither was filed; the sweep found one by the
    click's time and the other kept the referrer."""
    pipeline = Pipeline(settings, redis, pg)
    pipeline.combiner.expect = lambda: 2  # the gather ends once both batches came
    pipeline.combiner.gather_s = 30.0
    p, referrer = Person(), f"https://ref.test/{secrets.token_hex(4)}"
    click = _click(world, referrer)
    now = keys.partition_for(world.link["code"])
    then = next(q for q in range(keys.partitions) if q != now)
    batches = [await _read(redis, keys, q, [click]) for q in (then, now)]
    await asyncio.gather(*(pipeline.process(b) for b in batches))
    results = [b.result for b in batches]
    assert sorted(r.joined for r in results if r is not None) == [False, True], results  # one transaction
    pipeline.combiner.expect, pipeline.combiner.gather_s = (lambda: 1), 0.0
    lead = await _read(redis, keys, now, [_lead(world, click, p)])
    await pipeline.process(lead)
    assert len(await _holding(redis, keys, referrer.encode())) == 2

    await _erased_and_swept(pg, redis, keys, world, p)
    assert await _holding(redis, keys, referrer.encode()) == []


async def test_a_click_taken_without_its_link_and_appended_late_is_filed_under_its_links_workspace(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """An edge that could not resolve a link (Redis away) takes the click with its code
    alone, and a spool drains it long after its time: the sweep cannot find its entry by
    the click's time, so the workers file it, under its link's workspace (the store's,
    ``BatchResult.owners``). The old workers filed nothing for an event of no workspace,
    and the entry kept its referrer after the erasure of the lead that names the click."""
    pipeline = Pipeline(settings, redis, pg)
    p, referrer = Person(), f"https://ref.test/{secrets.token_hex(4)}"
    made = _click(world, referrer)
    old = uuid7(clock.now_ms() - 120_000)  # spooled two minutes ago
    payload = {**made.payload, "click_id": clicks.mint(old), "visitor_id": clicks.mint(old)}
    click = Envelope(EventType.CLICK, Dialect.AFFITOR, payload, None, IP, UA, old)
    now = keys.partition_for(world.link["code"])
    batch = await _read(redis, keys, now, [click])
    await pipeline.process(batch)
    assert batch.result is not None and batch.result.owners == {world.link["code"]: world.workspace_id}
    lead = await _read(redis, keys, now, [_lead(world, click, p)])
    await pipeline.process(lead)
    assert len(await _holding(redis, keys, referrer.encode())) == 1

    await _erased_and_swept(pg, redis, keys, world, p)
    assert await _holding(redis, keys, referrer.encode()) == []


async def test_a_click_waiting_in_its_workspaces_room_keeps_the_erasure_pending_until_stored_and_swept(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """A click the workers parked in its workspace's waiting room (its shard down, or the
    workspace fenced for a move: ``workers.consumer.waiting``) is acked in its stream, and no
    row holds it until the room drains. Its customer's erasure must not call Redis done
    meanwhile: the old sweep found no unread partition and no row, marked Redis done, and the
    click stored from the room later kept its referrer in its stream entry."""
    from workers.consumer import store

    pipeline = Pipeline(settings, redis, pg)
    p, referrer = Person(), f"https://ref.test/{secrets.token_hex(4)}"
    click = _click(world, referrer)
    now = keys.partition_for(world.link["code"])
    parked = await _read(redis, keys, now, [click])
    room = keys.waiting_room(world.workspace_id)
    (sid, fields) = parked.entries[0]
    assert fields is not None
    await redis.xadd(room, fields)  # parked as read, and acked, as the workers park
    await redis.sadd(keys.waiting_rooms, world.workspace_id)
    await redis.xack(parked.stream, GROUP, sid)
    lead = await _read(redis, keys, now, [_lead(world, click, p)])
    await pipeline.process(lead)

    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    await erasure.sweep(pg, redis, keys, None)
    assert [e for e in await erasure.status(pg) if "redis" in e["pending"]], "Redis called done"

    await store.write_batch(pg, [wire.from_entry(fields)])  # the room drained
    await redis.delete(room)
    await redis.srem(keys.waiting_rooms, world.workspace_id)

    async def swept() -> bool:
        await erasure.sweep(pg, redis, keys, None)
        return not [e for e in await erasure.status(pg) if "redis" in e["pending"]]

    await wait_for(swept, what="Redis done for the erasure")
    assert await _holding(redis, keys, referrer.encode()) == []


async def test_an_entry_the_sweep_must_find_by_its_digests_is_acked_only_once_filed(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """A click appended long after its time must be filed for the sweep. The old ack sent
    the filing after the XACK, in one pipeline: a filing refused (a full Redis; here, an index
    key that holds a string), a failover's replica that got the ack alone, or a worker killed
    between left the entry acked and filed nowhere, out of the sweep's reach, raw after its
    person's erasure (the generative test's ``erased_kept`` of a stream entry, seed
    988411963). Now it is acked once filed, and until then read again (a copy, filed)."""
    pipeline = Pipeline(settings, redis, pg)
    old = uuid7(clock.now_ms() - 120_000)  # spooled two minutes ago
    made = _click(world, f"https://ref.test/{secrets.token_hex(4)}")
    payload = {**made.payload, "click_id": clicks.mint(old), "visitor_id": clicks.mint(old)}
    click = Envelope(EventType.CLICK, Dialect.AFFITOR, payload, world.workspace_id, IP, UA, old)
    p = keys.partition_for(world.link["code"])
    batch = await _read(redis, keys, p, [click])
    async with pg.acquire() as conn:
        salt = await ledger.salt(conn)
    index = keys.entries_of(world.workspace_id, ledger.digests_of(salt, click, world.workspace_id)[0])
    await redis.set(index, b"not a set")
    try:
        await pipeline.process(batch)
        raise AssertionError("the filing went through")
    except Exception as exc:
        assert "WRONGTYPE" in f"{exc} {exc.__cause__}", exc
    assert (await redis.xpending(batch.stream, GROUP))["pending"] == 1  # not acked: read again
    assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", click.event_id) == 1

    await redis.delete(index)
    await pipeline.process(batch)  # the ack's turn again, as after an outage
    assert (await redis.xpending(batch.stream, GROUP))["pending"] == 0
    assert f"{p}:{batch.ids[0].decode()}".encode() in await redis.smembers(index)


async def test_each_entry_of_an_event_read_twice_in_one_batch_is_filed(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """A batch that reads two entries of one event (a spool's drain appended it again) and
    stores no row of it (here its link is gone; a waiting room's park is the same) must
    file both: the sweep cannot find either by a row. The batch kept one entry id per event,
    the last one read, so the first entry was filed nowhere; where a second batch did the
    same, the sweep's search by time stopped at one unfiled entry and never reached the
    other (the generative test's ``erased_kept`` of a click's entry, seed 233467243: one
    click appended eleven times by a drain across a failover, parked while its shard was
    down)."""
    pipeline = Pipeline(settings, redis, pg)
    click = _click(world, f"https://ref.test/{secrets.token_hex(4)}")
    click.payload["code"] = f"gone-{secrets.token_hex(4)}"  # no link: no row
    p = keys.partition_for(click.payload["code"])
    batch = await _read(redis, keys, p, [click, click])
    await pipeline.process(batch)
    assert batch.result is not None and click.event_id in batch.result.rowless, batch.result
    async with pg.acquire() as conn:
        salt = await ledger.salt(conn)
    index = keys.entries_of(world.workspace_id, ledger.digests_of(salt, click, world.workspace_id)[0])
    assert await redis.smembers(index) == {f"{p}:{sid.decode()}".encode() for sid in batch.ids}


async def test_the_sweep_deletes_the_click_cache_entries_of_the_persons_clicks_and_keeps_a_shared_ones(
    settings: Settings, redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """The erasure's request deletes the click cache's entries of the person's clicks (each
    keeps its visitor for the cookie window), best effort: a Redis away, or a failover that
    lost the delete, left them for the whole window, since the sweep deleted only those its
    stream entries name, and a trim takes those long before the window ends. Every sweep
    now deletes them again; a click another customer's lead names too stays, as the
    request keeps it (their erasure takes only what is theirs)."""
    pipeline = Pipeline(settings, redis, pg)
    p, other = Person(), Person()
    own, shared = _click(world, "https://ref.test/own"), _click(world, "https://ref.test/shared")
    part = keys.partition_for(world.link["code"])
    second = _lead(world, shared, p)
    second.payload["name"] = "Demo"  # a second lead of theirs, on the click the other's names
    leads = [_lead(world, own, p), second, _lead(world, shared, other)]
    batch = await _read(redis, keys, part, [own, shared, *leads])
    await pipeline.process(batch)
    assert batch.result is not None and batch.result.inserted == 5, batch.result
    await redis.xdel(batch.stream, *batch.ids)  # trimmed: the sweep meets none of their entries
    mine, theirs = keys.click(own.payload["click_id"]), keys.click(shared.payload["click_id"])
    for name in (mine, theirs):  # as the edge keeps them, here after the request's delete
        await redis.set(name, b"a visitor", ex=3600)

    await _erased_and_swept(pg, redis, keys, world, p)
    assert await redis.exists(mine) == 0
    assert await redis.exists(theirs) == 1  # the other customer's click too


async def test_an_erasure_learns_nothing_on_a_workspaces_copy_that_moved_away(
    redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """What an erased customer's late lead teaches the ledger (its click, its visitor) is
    written where the workspace is. The sweep and the archiver learn outside the workers'
    batches, without the workspace's fence lock: on the old copy, after a move's last catch
    up, their learning never reached the new shard, whose sweep then left the click's row
    and stream entry raw (the generative test's ``erased_kept``, seed 1986416062). Learning
    now holds the lock and meets ``Moved`` on a copy that moved away."""
    p = Person()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    lead = _lead(world, _click(world, "https://ref.test/late"), p)
    async with pg.acquire() as conn:
        salt = await ledger.salt(conn)

    async def entries() -> int:
        n: int = await pg.fetchval("SELECT count(*) FROM erased_ids WHERE workspace_id = $1", world.workspace_id)
        return n

    before = await entries()
    await pg.execute("UPDATE workspaces SET moved_to = 'elsewhere' WHERE id = $1", world.workspace_id)
    try:
        async with pg.acquire() as conn:
            with pytest.raises(placement.Moved):
                await ledger.learn(conn, salt, [(lead, world.workspace_id)], met=False)
        assert await entries() == before
        # a spool's drain checks the same way: it waits, and drains where the workspace is
        with pytest.raises(ledger.LedgerUnavailable):
            async with ledger.held(pg) as check:
                await check([lead])
    finally:
        await pg.execute("UPDATE workspaces SET moved_to = NULL WHERE id = $1", world.workspace_id)
    async with pg.acquire() as conn:
        assert await ledger.learn(conn, salt, [(lead, world.workspace_id)], met=False)
    assert await entries() == before + 2  # the visitor and the click


def _letter(keys: Keys, world: World, lead: Envelope) -> dict[Any, Any]:
    return {
        "stream": keys.stream_for(world.link["code"]),
        "id": "1-0",
        "error": "a test's",
        "deliveries": 5,
        "at": 0,
        **wire.to_entry_dict(lead),
    }


async def test_a_sweep_leaves_a_moved_away_workspaces_copies_to_its_new_shard_and_sweeps_the_rest(
    redis: Any, pg: asyncpg.Pool, keys: Keys, world: World
) -> None:
    """A dead letter of an erased customer's late lead, in a workspace whose copy here moved
    away: what it teaches is the new shard's ledger's to learn, and the letter its sweep's to
    scrub. The sweep here learned it anyway, met the workspace's fence (``Moved``) and
    failed whole, every time until the old copy was dropped: the erasures of the workspaces
    still here were never finished. It now leaves the moved workspace's copies alone and
    sweeps the rest."""
    from ._world import make_world

    other = await make_world(pg, redis, keys, code="SWEEPMOVED", name="Stays")
    p, q = Person(), Person()
    gone, here = _lead(world, _click(world, "https://ref.test/gone"), p), _lead(other, _click(other, "x"), q)
    for w, lead in ((world, gone), (other, here)):
        await redis.xadd(keys.dead, _letter(keys, w, lead))
    for w, person in ((world, p), (other, q)):
        await pg_erasure.erase(pg, w.workspace_id, person.external_id, by="test", archive_days=30)

    async def entries(ws: str) -> int:
        n: int = await pg.fetchval("SELECT count(*) FROM erased_ids WHERE workspace_id = $1", ws)
        return n

    before = await entries(world.workspace_id)
    await pg.execute("UPDATE workspaces SET moved_to = 'elsewhere' WHERE id = $1", world.workspace_id)
    try:

        async def swept() -> bool:
            await erasure.sweep(pg, redis, keys, None)
            return not await erasure.status(pg)

        await wait_for(swept, what="the erasure of the workspace still here done")
        letters = b" ".join(v for _, fields in await redis.xrange(keys.dead) for v in fields.values())
        assert p.email.encode() in letters  # the moved workspace's: its new shard's sweep's
        assert q.email.encode() not in letters
        assert await entries(world.workspace_id) == before  # nothing learned on the old copy
    finally:
        await pg.execute("UPDATE workspaces SET moved_to = NULL WHERE id = $1", world.workspace_id)
