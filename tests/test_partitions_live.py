"""The partition count changed live (``ingest.contract.layout``, ``refstream partitions set``):
a grow makes the new streams with every group before an edge writes them; a retired
partition is fenced (no append, no group makes it again) until a grow brings it back; an
edge follows the count without a restart; a keyed retry after the change gets its first
answer; spooled rows of a retired partition drain into the current count; and, with real
processes (the edge and a worker as the README runs them), 2 → 4 → 1 under requests loses
and doubles nothing, and leaves the retired partitions deleted."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from ingest.contract import layout, wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.edge.enqueue import OUTCOME
from ingest.edge.state import EDGE
from ingest.link.once import APPEND_ONCE
from ingest.manage import admin
from ingest.spool.spool import Spool
from ingest.spool.store import Once

from ._procs import Procs
from ._world import World, call, make_world, start_edge
from .conftest import wait_for

WINDOW_MS = 60_000
ARCHIVE = "archive"


def _code_moving(old: int, new: int, keys: Keys) -> str:
    """A link code whose partition differs between ``old`` and ``new`` partitions (not 0)."""
    for i in range(1000):
        code = f"MOVE{i}"
        a, b = keys.partition_for(code, old), keys.partition_for(code, new)
        if a != b and a != 0:
            return code
    raise AssertionError("no code moves")


async def _groups(redis: aioredis.Redis, stream: str) -> set[str]:
    return {g["name"].decode() for g in await redis.xinfo_groups(stream)}


async def test_a_grow_makes_each_stream_with_every_group_and_a_retired_partition_stays_fenced(
    redis: aioredis.Redis, settings: Settings
) -> None:
    keys = Keys(settings.stream_prefix, 2)
    for p in range(2):
        await layout.ensure(redis, keys, p, (GROUP, ARCHIVE))
    before, after = await layout.set_count(redis, keys, 2, 4, window_ms=WINDOW_MS)
    assert (before.count, after.count, after.span, after.high) == (2, 4, 4, 4)
    for p in (2, 3):  # made before any edge routes there, from id 0, with the archive's group too
        assert await _groups(redis, keys.stream(p)) == {GROUP, ARCHIVE}

    await redis.xadd(keys.stream(3), {"e": "x"})
    # the shrink in a later millisecond of Redis's clock than the grow made partition 3 in: a
    # retire counts a partition made again in its layout's very millisecond as made after it
    # (and leaves it), which is not what this test is about (a clean-clone CI run met it)
    # (and past the grow's own change: a shrink in that millisecond would leave the layout's
    # changed_ms as the grow's, and "routed by 2 from the earlier layout" would not be stale;
    # a clean-clone CI run met that too)
    grown_ms = max(int(await redis.get(keys.revived(3))), after.changed_ms)

    async def a_later_ms() -> bool:
        return await layout._now_ms(redis) > grown_ms

    await wait_for(a_later_ms, timeout=5, what="Redis's clock past the grow's millisecond")
    _, shrunk = await layout.set_count(redis, keys, 2, 2, window_ms=WINDOW_MS)
    assert (shrunk.count, list(shrunk.retiring)) == (2, [2, 3])
    assert shrunk.earlier(after.changed_ms) == (4,)  # keyed retries look where 4 partitions put them
    assert await layout.retire(redis, keys, 2) == []  # within the grace: nothing yet
    assert await layout.retire(redis, keys, 2, grace_ms=0) == [2]  # 3 still holds an entry
    assert (await layout.load(redis, keys, 2)).span == 4
    await redis.xtrim(keys.stream(3), maxlen=0)
    assert await layout.retire(redis, keys, 2, grace_ms=0) == [3]
    assert (await layout.load(redis, keys, 2)).span == 2
    assert not await redis.exists(keys.stream(2), keys.stream(3))

    # the fence: an append by an edge still routing by 4, the script's, a worker's group
    assert await redis.execute_command("XADD", keys.stream(3), "NOMKSTREAM", "*", "e", "late") is None
    with pytest.raises(aioredis.ResponseError, match="GONE"):
        await layout._eval(
            redis, APPEND_ONCE, 2, keys.idempotent("d", 3), keys.stream(3), b"a", WINDOW_MS, "", "", "e", "late"
        )
    with pytest.raises(layout.Retired):
        await layout.ensure(redis, keys, 3, (GROUP,))
    assert not await redis.exists(keys.stream(3), keys.idempotent("d", 3))

    # a keyed append routed by another count than the layout's is refused, even into a
    # partition that is still written: its copy would sit where no current copy looks
    # (or by the same count read from an earlier layout: 2 -> 4 -> 2 left after.changed_ms)
    for routed, changed, key in (
        (4, shrunk.changed_ms, "stale"),
        (3, shrunk.changed_ms, "other"),
        (2, after.changed_ms, "earlier"),
    ):
        with pytest.raises(aioredis.ResponseError, match="STALE"):
            await layout._eval(
                redis,
                APPEND_ONCE,
                3,
                keys.idempotent(key, 1),
                keys.stream(1),
                keys.layout,
                b"a",
                WINDOW_MS,
                routed,
                changed,
                "e",
                key,
            )
        assert not await redis.exists(keys.idempotent(key, 1))
    length = await redis.xlen(keys.stream(1))
    assert (
        await layout._eval(
            redis,
            APPEND_ONCE,
            3,
            keys.idempotent("now", 1),
            keys.stream(1),
            keys.layout,
            b"a",
            WINDOW_MS,
            2,
            shrunk.changed_ms,
            "e",
            "now",
        )
        is None
    )
    assert await redis.xlen(keys.stream(1)) == length + 1 and await redis.get(keys.idempotent("now", 1)) == b"a"

    await layout.set_count(redis, keys, 2, 4, window_ms=WINDOW_MS)  # a grow brings 3 back
    assert await _groups(redis, keys.stream(3)) == {GROUP, ARCHIVE}


def _envelope(code: str, workspace: str) -> Envelope:
    return Envelope(EventType.CLICK, Dialect.AFFIXO, {"code": code, "visitor_id": "v"}, workspace_id=workspace)


async def _streams(redis: aioredis.Redis, settings: Settings, n: int) -> Keys:
    """``n`` partitions, each stream made with the workers' group."""
    keys = Keys(settings.stream_prefix, n)
    for p in range(n):
        await layout.ensure(redis, keys, p, (GROUP,))
    return keys


async def _drain(spool: Spool, redis: aioredis.Redis, settings: Settings, n: int, rows: int) -> None:
    """Start ``spool``'s drain, following the layout from ``n`` partitions, and wait until it
    has sent (or found done) ``rows`` rows."""
    spool.start(redis, every_s=0.05, layout=layout.Watch(redis, Keys(settings.stream_prefix, n), n))

    async def drained() -> bool:
        return spool.drained >= rows

    await wait_for(drained, what="the spool to drain")


async def test_spooled_rows_of_a_retired_partition_drain_into_the_current_count(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    keys = await _streams(redis, settings, 4)
    code = _code_moving(4, 2, keys)
    old = keys.partition_for(code, 4)
    plain, fresh, copied = (_envelope(code, "w") for _ in range(3))
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    try:
        # spooled while 4 partitions were written: one unkeyed, two keyed, one of whose key
        # a copy reached Redis meanwhile (its record where 4 partitions put it)
        assert await spool.append(keys.stream(old), wire.to_blob(plain)) is None
        for envelope, key in ((fresh, "k1"), (copied, "k2")):
            once = Once(keys.idempotent(key, old), f"answer-{key}".encode(), WINDOW_MS)
            assert await spool.append(keys.stream(old), wire.to_blob(envelope), once=once) is None
        await redis.set(keys.idempotent("k2", old), b"first-copy", px=WINDOW_MS)
        await layout.set_count(redis, keys, 4, 2, window_ms=WINDOW_MS)
        assert await layout.retire(redis, keys, 4, grace_ms=0) == [2, 3]
        await _drain(spool, redis, settings, 4, 3)  # the copied row counts as done: its key's copy is in Redis
    finally:
        await spool.close()
    new = keys.partition_for(code, 2)
    ids = [f[b"e"] if b"e" in f else None for _, f in await redis.xrange(keys.stream(new))]
    assert len(ids) == 2, "the unkeyed row and the keyed one whose key had no copy, in the code's partition now"
    assert not await redis.exists(keys.stream(old))
    assert await redis.get(keys.idempotent("k1", new)) == b"answer-k1"  # the key's record moved with it
    assert await redis.get(keys.idempotent("k2", new)) is None  # not appended: nothing recorded


AFFIXO = "/v1/track/click"


async def test_a_spooled_keyed_row_is_checked_where_an_earlier_count_put_its_key(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # issue 24, the generative test's seed 1987195627: a keyed click answered "may be stored"
    # while 8 partitions were written (its record where 8 put it); the count went back to 4;
    # a retry was spooled by an edge routing by 4, and its drain appended a second copy
    # without looking where 8 had put the key's record
    keys = await _streams(redis, settings, 8)
    code = _code_moving(8, 4, keys)
    by8, by4 = keys.partition_for(code, 8), keys.partition_for(code, 4)
    await redis.set(keys.idempotent("k", by8), b"the-first-copy", px=WINDOW_MS)  # its script's record
    await layout.set_count(redis, keys, 8, 4, window_ms=WINDOW_MS)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    try:
        once = Once(keys.idempotent("k", by4), b"the-second-copy", WINDOW_MS)
        assert await spool.append(keys.stream(by4), wire.to_blob(_envelope(code, "w")), once=once) is None
        await _drain(spool, redis, settings, 8, 1)  # done: its key's first copy is in Redis
    finally:
        await spool.close()
    assert await redis.xlen(keys.stream(by4)) == 0, "a second copy of the key was appended"
    assert await redis.get(keys.idempotent("k", by4)) is None


async def test_a_spooled_keyed_row_whose_record_and_stream_disagree_is_checked_where_both_put_its_key(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # issue 24, the hour-long generative run's seed 1419696670: an edge started during a Redis
    # stall made a keyed click's check by the default count (4: its record where 4 puts the
    # key), read the layout (1) before the append came back refused (STALE), and spooled the
    # row under the stream of count 1. The drain looked for the key only where the row's
    # stream said (partition 0 by count 1, from the record's tag it did not carry), missed
    # the first copy another edge had stored there, and appended a second
    keys = await _streams(redis, settings, 4)
    code = next(f"SKEW{i}" for i in range(1000) if keys.partition_for(f"SKEW{i}", 4) != 0)
    by4 = keys.partition_for(code, 4)
    await layout.set_count(redis, keys, 4, 1, window_ms=WINDOW_MS)
    await redis.set(keys.idempotent("k", 0), b"the-first-copy", px=WINDOW_MS)  # the other edge's, by 1
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    try:
        once = Once(keys.idempotent("k", by4), b"the-second-copy", WINDOW_MS)  # checked by 4, spooled by 1
        assert await spool.append(keys.stream(0), wire.to_blob(_envelope(code, "w")), once=once) is None
        await _drain(spool, redis, settings, 4, 1)  # done: its key's first copy is in Redis
    finally:
        await spool.close()
    assert await redis.xlen(keys.stream(0)) == 0, "a second copy of the key was appended"


async def _click(edge: str, world: World, code: str, key: str | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {world.api_key}", **({"Idempotency-Key": key} if key else {})}
    return await call("POST", f"{edge}{AFFIXO}", json={"ref": code, "url": "https://a.test/"}, headers=headers)


async def _two_edges_at_4(
    pg: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, tmp_path: Path, then: int
) -> tuple[Keys, str, World, tuple[Any, str], tuple[Any, str]]:
    """Four partitions, a world whose link's code moves between 4 and ``then``, and two edges."""
    keys = Keys(settings.stream_prefix, 4)
    code = _code_moving(4, then, keys)
    world = await make_world(pg, redis, keys, code=code)
    four = settings.model_copy(update={"partitions": 4, "key_rate_limit_per_min": 1_000_000})
    a = await start_edge(four.model_copy(update={"spool_dir": str(tmp_path / "a")}))
    b = await start_edge(four.model_copy(update={"spool_dir": str(tmp_path / "b")}))
    return keys, code, world, a, b


async def test_an_edge_that_has_not_read_a_change_is_refused_a_keyed_append(
    pg: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # issue 24, the generative test's seed 621014955: an edge frozen across a shrink appended
    # a keyed copy by the old count after another edge had answered the key's first copy
    keys, code, world, (runner_a, a), (runner_b, b) = await _two_edges_at_4(pg, redis, settings, tmp_path, 2)
    try:
        await layout.set_count(redis, keys, 4, 2, window_ms=WINDOW_MS)

        async def read_by_both() -> bool:
            return all(r.app[EDGE].idem.keys.partitions == 2 for r in (runner_a, runner_b))

        await wait_for(read_by_both, what="both edges to read the new count")
        stale = runner_a.app[EDGE].idem.keys
        stale.resize(4)  # edge A has not read the change (frozen, or within its second)
        status, first, _ = await _click(b, world, code, "k-across")
        assert status == 200, first
        refused = await _click(a, world, code, "k-across")
        assert refused[0] == 503 and refused[2].get("Retry-After") == "1", refused
        assert OUTCOME not in refused[2]  # a refusal: nothing was appended
        stale.resize(2)  # edge A reads the layout
        again = await _click(a, world, code, "k-across")
        assert again[:2] == (200, first) and again[2].get("Idempotent-Replayed") == "true", again
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()
    lengths = [await redis.xlen(keys.stream(p)) for p in range(4)]
    assert sum(lengths) == 1, lengths  # the key's first copy, once


async def test_an_edge_that_slept_through_a_change_and_back_is_refused_a_keyed_append(
    pg: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # issue 24, the generative test's seed 1378581526: an edge frozen while the count went
    # 4 -> 3 (another edge answered a keyed copy by 3 meanwhile) and back to 4 routed the
    # key's retry by 4, the count of the layout in Redis, and looked for no record where 3
    # had put it: a second copy appended, and answered 200 with its own event id
    keys, code, world, (runner_a, a), (runner_b, b) = await _two_edges_at_4(pg, redis, settings, tmp_path, 3)
    edge_a = runner_a.app[EDGE]
    reads = edge_a.idem._layout
    try:
        assert reads is not None
        asleep = reads()  # edge A's layout stays the one it read before the changes (frozen)
        edge_a.idem._layout = lambda: asleep

        async def read(count: int) -> bool:
            return all(r.app[EDGE].idem.keys.partitions == count for r in (runner_a, runner_b))

        await layout.set_count(redis, keys, 4, 3, window_ms=WINDOW_MS)
        await wait_for(lambda: read(3), what="both edges to route by 3")
        status, first, _ = await _click(b, world, code, "k-there-and-back")
        assert status == 200, first
        await layout.set_count(redis, keys, 4, 4, window_ms=WINDOW_MS)
        await wait_for(lambda: read(4), what="both edges to route by 4 again")
        refused = await _click(a, world, code, "k-there-and-back")
        assert refused[0] == 503 and OUTCOME not in refused[2], refused  # a refusal: nothing appended
        edge_a.idem._layout = reads  # edge A reads the layout: 3 is among its earlier counts
        again = await _click(a, world, code, "k-there-and-back")
        assert again[:2] == (200, first) and again[2].get("Idempotent-Replayed") == "true", again
    finally:
        edge_a.idem._layout = reads
        await runner_a.cleanup()
        await runner_b.cleanup()
    lengths = [await redis.xlen(keys.stream(p)) for p in range(4)]
    assert sum(lengths) == 1, lengths  # the key's first copy, once


@pytest.mark.timeout(240)
async def test_edge_and_worker_follow_2_4_1_partitions_under_requests_and_lose_nothing(
    procs: Procs, pg: asyncpg.Pool, redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    env = {
        "REFSTREAM_PARTITIONS": "2",
        "REFSTREAM_STREAM_RETENTION_S": "1",
        "REFSTREAM_TRIM_EVERY_S": "1",
        "REFSTREAM_KEY_RATE_LIMIT_PER_MIN": "1000000",
    }
    keys = Keys(settings.stream_prefix, 2)
    code = _code_moving(2, 4, keys)
    world = await make_world(pg, redis, keys, code=code)
    codes = [code, *(f"C{i}" for i in range(12))]
    async with pg.acquire() as conn:
        for c in codes[1:]:
            await admin.create_link(
                conn,
                redis,
                keys,
                workspace_id=world.workspace_id,
                code=c,
                url="https://yoursite.com/",
                program_id=world.program_id,
                affiliate_id=world.affiliate_id,
            )
    edge = await procs.start_edge(**env)
    procs.start("work", **env)
    accepted: list[str] = []  # the event ids answered 200
    answers: dict[int, int] = {}
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            status, body, _ = await _click(edge, world, codes[i % len(codes)])
            answers[status] = answers.get(status, 0) + 1
            if status == 200:
                accepted.append(str(body.get("click_id") or body.get("event_id") or body))
            i += 1

    async def lands_in(p: int) -> bool:
        length: int = await redis.xlen(keys.stream(p))
        return length > 0

    sender = asyncio.create_task(load())
    try:
        status, first, _ = await _click(edge, world, code, "key-across")
        assert status == 200, first
        grown = await procs.cli("partitions", "set", "4", **env)
        assert (grown["before"], grown["count"], grown["span"]) == (2, 4, 4)
        await wait_for(lambda: lands_in(3), what="the edge to write partition 3 without a restart")
        assert keys.partition_for(code, 4) != keys.partition_for(code, 2)
        again = await _click(edge, world, code, "key-across")  # routed elsewhere now: the first answer
        assert again[:2] == (200, first) and again[2].get("Idempotent-Replayed") == "true", again

        shrunk = await procs.cli("partitions", "set", "1", "--wait", "--timeout", "120", **env)
        assert (shrunk["count"], shrunk["span"], shrunk["retiring"]) == (1, 1, [])
    finally:
        stop.set()
        await sender
    for p in (1, 2, 3):
        assert not await redis.exists(keys.stream(p)) and await redis.exists(keys.retired(p))
    status_json = await procs.cli("status", check=False, **env)
    assert [p["partition"] for p in status_json["partitions"]] == [0]

    await procs.cli("work", "--drain", **env)
    stored = await pg.fetchval("SELECT count(*) FROM events WHERE dialect = 'affixo'")
    expected = answers.get(200, 0) + 1  # the load's, and the keyed click once
    assert stored == expected, (stored, expected, answers)
    clicks = await pg.fetchval("SELECT sum(clicks) FROM links WHERE workspace_id = $1", uuid.UUID(world.workspace_id))
    assert clicks == stored
    assert set(answers) <= {200, 503}, answers  # a refusal (503, Retry-After) is never counted
    assert answers.get(200, 0) > 50, answers


async def test_a_retire_that_read_the_layout_before_a_grow_leaves_the_partitions_it_made(
    redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's retire that loaded the layout while partitions were retiring, then ran its
    scripts after a grow made them again, deleted written partitions and marked them retired:
    every append there was GONE for good, and an edge's spool could not drain (the generative
    test's seed 1349964483: 4 -> 1 -> 4 around a worker's housekeeping)."""
    keys = Keys(settings.stream_prefix, 4)
    for p in range(4):
        await layout.ensure(redis, keys, p, (GROUP, ARCHIVE))
    await layout.set_count(redis, keys, 4, 1, window_ms=WINDOW_MS)
    stale = await layout.load(redis, keys, 4)  # partitions 1-3 retiring, all empty
    assert list(stale.retiring) == [1, 2, 3]
    await layout.set_count(redis, keys, 4, 4, window_ms=WINDOW_MS)  # grown back before the retire ran
    real_load = layout.load

    async def as_the_worker_read_it(*args: object, **kw: object) -> layout.Layout:
        monkeypatch.setattr(layout, "load", real_load)
        return stale

    monkeypatch.setattr(layout, "load", as_the_worker_read_it)
    assert await layout.retire(redis, keys, 4, grace_ms=0) == []
    for p in range(4):  # every written partition still takes appends
        assert await redis.execute_command("XADD", keys.stream(p), "NOMKSTREAM", "*", "e", "x") is not None
    assert not any([await redis.exists(keys.retired(p)) for p in range(4)])
    # and a later retire, on the layout as it is, finds nothing retiring
    assert await layout.retire(redis, keys, 4, grace_ms=0) == []


async def test_status_shows_a_retiring_partition_until_it_is_retired(
    redis: aioredis.Redis, settings: Settings, pg: asyncpg.Pool
) -> None:
    """After a shrink, ``refstream status`` lists the partitions past the count as retiring
    while they hold entries, with their length; once retired, not at all."""
    from ._procs import env_for, run_command

    keys = Keys(settings.stream_prefix, 4)
    for p in range(4):
        await layout.ensure(redis, keys, p, (GROUP, ARCHIVE))
    await redis.xadd(keys.stream(3), {"e": "x"})
    await layout.set_count(redis, keys, 4, 2, window_ms=WINDOW_MS)

    async def shown() -> dict[int, dict[str, Any]]:
        code, out, err = await run_command("status", "--json", env=env_for(settings))
        assert code in (0, 1, 3), err  # (a group with no consumer is a finding, not a failure)
        return {p["partition"]: p for p in orjson.loads(out)["partitions"]}

    listed = await shown()
    assert sorted(listed) == [0, 1, 2, 3]
    assert listed[3]["retiring"] and listed[3]["length"] == 1 and not listed[1]["retiring"]
    await redis.xtrim(keys.stream(3), maxlen=0)
    assert sorted(await layout.retire(redis, keys, 2, grace_ms=0)) == [2, 3]
    assert sorted(await shown()) == [0, 1]


async def test_a_replay_reads_a_retired_partitions_entries_from_the_archive(
    redis: aioredis.Redis, settings: Settings, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """A partition retired by a shrink is gone from Redis; its entries are in the archive,
    and a replay of the range (into a Postgres that lacks them: restored from before)
    reads them there and stores them once."""
    from datetime import UTC, datetime, timedelta

    from workers.archive.store import open_store
    from workers.ops.replay import Range, Source, replay

    from .test_archive import archived, run_archiver

    settings = archived(settings.model_copy(update={"partitions": 4}), tmp_path)
    keys = Keys(settings.stream_prefix, 4)
    code = next(c for c in (f"RET{i}" for i in range(1000)) if keys.partition_for(c) == 3)
    world = await make_world(pg, redis, keys, code=code)
    for p in range(4):
        await layout.ensure(redis, keys, p, (GROUP, ARCHIVE))
    started = datetime.now(UTC) - timedelta(minutes=1)
    e = _envelope(code, world.workspace_id)
    await redis.xadd(keys.stream(3), wire.to_entry_dict(e))  # type: ignore[arg-type]  # redis-py's dict is invariant
    await run_archiver(settings, redis)
    # the workers' group read and acknowledged it (stored, then lost with a restore of Postgres)
    read = await redis.xreadgroup(GROUP, "w1", {keys.stream(3): ">"})
    await redis.xack(keys.stream(3), GROUP, *[i for i, _ in read[0][1]])
    await layout.set_count(redis, keys, 4, 2, window_ms=WINDOW_MS)
    await redis.xtrim(keys.stream(3), maxlen=0)
    assert sorted(await layout.retire(redis, keys, 2, grace_ms=0)) == [2, 3]
    assert not await redis.exists(keys.stream(3))

    now = Keys(settings.stream_prefix, 2)
    done = await replay(Source(redis, open_store(settings), now.prefix), pg, now, Range(since=started))
    assert (done.total("archived"), done.total("inserted")) == (1, 1), done.to_dict()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", e.event_id) == 1
    again = await replay(Source(redis, open_store(settings), now.prefix), pg, now, Range(since=started))
    assert again.total("inserted") == 0
