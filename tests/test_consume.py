"""Consumption that never loses or double counts: poison entries isolated, trimming that
never removes what a group still needs."""

from __future__ import annotations

import asyncio

import asyncpg

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD
from workers.consumer import trim

from ._entries import v2_of, v3_with
from ._procs import Procs
from .test_e2e import TRACKED, fire


async def test_an_undecodable_entry_is_dead_lettered_and_its_batch_counts(procs: Procs, pg, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000")
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 5))
    stream = keys.stream_for("alice")
    bad = await redis.xadd(stream, {FIELD: b"\x00 not an envelope"})
    # a foreign producer's entry, without the envelope field at all: one entry in, one outcome out
    foreign = await redis.xadd(stream, {b"event": b"click", b"code": b"alice"})
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 5))
    totals = await procs.cli("work", "--drain")
    assert (totals["inserted"], totals["dead"]) == (10, 2)
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == 10
    dead = {fields[b"id"]: fields for _, fields in await redis.xrange(keys.dead)}
    assert set(dead) == {bad, foreign}
    assert dead[bad][b"error"].startswith(b"decode:") and dead[bad][b"stream"] == stream.encode()
    assert dead[bad][FIELD] == b"\x00 not an envelope"
    assert dead[foreign][b"error"].startswith(b"decode: no ") and dead[foreign][FIELD] == b""
    assert dead[foreign][b"field:code"] == b"alice"  # what it carried, for whoever investigates
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


async def test_an_entry_deleted_while_pending_is_acked_not_dead_lettered(procs: Procs, pg, redis, keys: Keys):
    """An entry a trim or an XDEL removed while a worker held it pending comes back to its
    reader as its id with no fields (redis-py: an empty dict, not None): nothing is left to
    store, and it is no poison (the generative test's seed 86656145: a trim storm's)."""
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000")
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 5))
    stream = keys.stream_for("alice")
    read = await redis.xreadgroup(GROUP, "w", {stream: ">"})  # pending to w, as a worker stopped mid-batch
    ids = [sid for sid, _ in read[0][1]]
    assert len(ids) == 5
    assert await redis.xdel(stream, ids[2]) == 1
    totals = await procs.cli("work", "--drain", REFSTREAM_CONSUMER_NAME="w")  # its own pending first
    assert (totals["inserted"], totals["dead"]) == (4, 0)
    assert await redis.xlen(keys.dead) == 0
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


def _same_partition(keys: Keys, code: str) -> str:
    return next(c for c in (f"POISON{i}" for i in range(1000)) if keys.partition_for(c) == keys.partition_for(code))


async def test_an_entry_that_kills_workers_is_dead_lettered_after_n_attempts(procs: Procs, pg, redis, keys: Keys):
    poison = _same_partition(keys, "alice")
    ws = await procs.cli("workspace", "create", "Acme")
    for code in ("alice", poison):
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000")
    for codes in (["alice"] * 5, [poison], ["alice"] * 5):
        assert all(r == (200, TRACKED) for r in await fire(base, codes, concurrency=1))

    env = {"REFSTREAM_CONSUMER_NAME": "w", "REFSTREAM_MAX_DELIVERIES": "2"}
    exits = []
    for _ in range(8):
        worker = procs.start("work", "--drain", failpoint=f"crash_on:{poison}", **env)
        exits.append(await asyncio.to_thread(worker.wait, 60))
        if exits[-1] == 0:
            break
    # its first batch (not counted: first deliveries cost nothing to track), then 2 counted
    # attempts read from the backlog, each a killed worker; the next reader sets it aside
    assert exits == [-9, -9, -9, 0], exits

    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == 10
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = $1", poison) == 0
    (dead,) = await redis.xrange(keys.dead)
    assert dead[1][b"error"] == b"a worker stopped while processing it 2 times (limit 2)"
    assert int(dead[1][b"deliveries"]) == 2
    assert await redis.hlen(keys.attempts(keys.partition_for(poison))) == 0  # counts go with their entries
    assert (await redis.xpending(keys.stream_for("alice"), GROUP))["pending"] == 0


async def test_trimming_never_removes_what_a_lagging_group_needs(redis, keys: Keys, pg: asyncpg.Pool):
    stream = keys.streams[0]
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {FIELD: b"x%d" % i}) for i in range(20)]
    await redis.xgroup_create(stream, "lagging", id="0")
    # the workers read and ack everything; the lagging group read 10 and acked the first 5
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=100)
    await redis.xack(stream, GROUP, *ids)
    await redis.xreadgroup("lagging", "l", {stream: ">"}, count=10)
    await redis.xack(stream, "lagging", *ids[:5])

    assert await trim.trim(redis, keys, retention_s=7 * 86400, exact=True) == {}  # retention keeps all
    removed = await trim.trim(redis, keys, retention_s=0, exact=True)
    assert removed == {stream: 5}
    left = [eid for eid, _ in await redis.xrange(stream)]
    assert left == ids[5:]  # lagging's pending 6-10 and its undelivered 11-20 are all still there

    await redis.xack(stream, "lagging", *ids[5:10])
    await trim.trim(redis, keys, retention_s=0, exact=True)
    assert [eid for eid, _ in await redis.xrange(stream)] == ids[10:]  # read by nobody in "lagging" yet
    # a partition that no group reads is never trimmed
    await redis.xadd(keys.streams[1], {FIELD: b"y"})
    await trim.trim(redis, keys, retention_s=0, exact=True)
    assert await redis.xlen(keys.streams[1]) == 1


async def test_older_entries_still_decode_and_a_broken_one_is_dead_lettered_verbatim(
    procs: Procs, pg, redis, keys: Keys
):
    """Entries of every wire version in one stream (an upgrade with a backlog): each stored
    once; a version-3 or version-2 entry that does not decode keeps its fields, verbatim,
    in its letter."""
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    stream = keys.stream_for("alice")

    def click() -> Envelope:
        return Envelope(EventType.CLICK, Dialect.BIORE, {"code": "alice"}, ws["workspace_id"], "203.0.113.7", "ü")

    await redis.xadd(stream, {FIELD: wire.to_blob(click())})  # version 1, as the edge wrote before
    await redis.xadd(stream, v2_of(click()))  # version 2, as it wrote since
    await redis.xadd(stream, wire.to_entry_dict(click()))
    broken = [v3_with(click(), b"{not json"), v2_of(click(), b"{not json")]
    bad = [await redis.xadd(stream, fields) for fields in broken]
    totals = await procs.cli("work", "--drain")
    assert (totals["inserted"], totals["dead"]) == (3, 2)
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == 3
    letters = await redis.xrange(keys.dead)
    assert [letter[b"id"] for _, letter in letters] == bad
    for (dead_id, letter), fields in zip(letters, broken, strict=True):
        assert letter[b"error"].startswith(b"decode: ")
        assert {k: letter[k] for k in fields} == fields
        assert FIELD not in letter and not any(k.startswith(b"field:") for k in letter)
        shown = await procs.cli("dead", "show", "--json", dead_id.decode())
        assert shown["envelope"] is None and shown["raw_fields"] == {k.decode(): repr(v) for k, v in fields.items()}
    assert (await redis.xpending(stream, GROUP))["pending"] == 0
