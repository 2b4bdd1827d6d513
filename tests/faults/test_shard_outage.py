"""One shard of two goes down under load: its workspaces' events wait (in their waiting
rooms), the other shard goes on committing, and once it is back every event answered 200
is stored once, on its own shard, with counters equal to their rows and nothing pending."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings

from .._procs import Procs, env_for, run_command
from ..conftest import wait_for
from ..test_e2e import TRACKED, fire
from ..test_shards import _COUNTERS_OFF
from ._servers import PgServer

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


async def _count(url: str, code: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM events e JOIN links l ON l.id = e.link_id WHERE l.code = $1", code
        )
        return n
    finally:
        await conn.close()


async def test_a_shard_down_stops_only_its_own_workspaces(
    settings: Settings, tmp_path: Any, scratch_url: str, redis: Any
) -> None:
    shard = PgServer()
    shard.init()
    shard.start()
    s = settings.model_copy(update={"database_url": scratch_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        await shard.ready()
        b_url = shard.url_for("refstream")
        edge = await two_workspaces(procs, b_url)
        replies, stop, firing = load(edge)
        try:
            await wait_for(lambda: _count(b_url, "bcode"), what="shard b storing")
            await asyncio.to_thread(shard.stop, "fast")
            down_at = await _count(scratch_url, "acode")
            # the other shard goes on committing while b is down
            await wait_for(
                lambda: _more(scratch_url, "acode", down_at + 200), timeout=60, what="default committing alone"
            )

            # b's workspace waits in its room: a batch's part for default commits while its
            # part for b is still meeting the outage, so under load the room may come after
            async def rooms() -> Any:
                return await redis.smembers(keys.waiting_rooms)

            assert len(await wait_for(rooms, timeout=60, what="b's room")) == 1
            _, out, _ = await run_command("status", "--json", env=env_for(s))  # and status says so
            waiting = orjson.loads(out)["waiting"]
            assert waiting["rooms"] == 1 and waiting["events"] > 0, waiting
            shard.start()
            await shard.ready()
        finally:
            stop.set()
            await firing
        await all_stored_once(procs, redis, keys, replies, scratch_url, b_url)
        for url in (scratch_url, b_url):
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("SELECT count(*) = count(DISTINCT event_id) FROM events")
            finally:
                await conn.close()
    finally:
        procs.stop_all()
        shard.destroy()


async def test_a_worker_started_while_a_shard_is_down_stores_the_other_shards_events(
    settings: Settings, tmp_path: Any, scratch_url: str, redis: Any
) -> None:
    """A worker restores the erasure ledger's copy on every shard before its first batch. One
    shard's restore failing (its Postgres down) held every batch of the worker: a worker
    started, or restarted, during one shard's outage stored nothing for any shard until it
    ended. Each shard's restore is its own now: the other shard's events are stored, the down
    one's wait in their rooms, and its restore is made before anything is written there."""
    shard = PgServer()
    shard.init()
    shard.start()
    s = settings.model_copy(update={"database_url": scratch_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        await shard.ready()
        b_url = shard.url_for("refstream")
        edge = await two_workspaces(procs, b_url, workers=0)
        conn = await asyncpg.connect(b_url)
        try:  # an erasure on b, its copy in Redis: what a worker restores there first
            (b,) = [str(r["id"]) for r in await conn.fetch("SELECT id FROM workspaces")]
        finally:
            await conn.close()
        await procs.cli("erase", "--workspace", b, "--customer", "cust-gone")
        replies, stop, firing = load(edge)
        try:
            await asyncio.to_thread(shard.stop, "fast")
            first = procs.start("work")  # after the shard went down: its restore there fails
            await wait_for(lambda: _more(scratch_url, "acode", 200), timeout=90, what="default stored meanwhile")
            await wait_for(lambda: redis.scard(keys.waiting_rooms), what="b's workspace waiting in its room")
            shard.start()
            await shard.ready()
            await wait_for(lambda: _more(b_url, "bcode", 1), timeout=90, what="b's events stored once it is back")
            assert first.poll() is None  # the same worker: its restore on b made once b answered
        finally:
            stop.set()
            await firing
        await all_stored_once(procs, redis, keys, replies, scratch_url, b_url)
    finally:
        print(procs.logs()[-6000:])
        procs.stop_all()
        shard.destroy()


async def two_workspaces(procs: Procs, b_url: str, workers: int = 2) -> str:
    """Shard b at ``b_url`` added, workspace A on default with link acode and B on b with
    bcode, an edge and ``workers`` workers started: the edge's address."""
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", b_url)
    a = await procs.cli("workspace", "create", "A", "--shard", "default")
    b = await procs.cli("workspace", "create", "B", "--shard", "b")
    await procs.cli("link", "create", "--workspace", a["workspace_id"], "--code", "acode")
    await procs.cli("link", "create", "--workspace", b["workspace_id"], "--code", "bcode")
    edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
    for _ in range(workers):
        procs.start("work")
    return edge


Replies = dict[str, list[tuple[int, object]]]


def load(edge: str) -> tuple[Replies, asyncio.Event, asyncio.Task[None]]:
    """Clicks on acode and bcode, ten at a time each, until the event is set: their answers."""
    replies: Replies = {"acode": [], "bcode": []}
    stop = asyncio.Event()

    async def fire_until_stopped() -> None:
        while not stop.is_set():
            for code in replies:
                replies[code].extend(await fire(edge, [code] * 10, concurrency=4))

    return replies, stop, asyncio.create_task(fire_until_stopped())


async def all_stored_once(procs: Procs, redis: Any, keys: Keys, replies: Replies, a_url: str, b_url: str) -> None:
    """Every click answered 200, and once drained each stored on its own shard, nothing
    pending, no room left, counters equal to their rows on both shards."""
    for code, got in replies.items():
        assert got and all(r == (200, TRACKED) for r in got), (code, [r for r in got if r != (200, TRACKED)][:3])
    await procs.cli("work", "--drain", timeout=180)
    for stream in keys.streams:
        (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
        assert group["pending"] == 0
    assert await redis.scard(keys.waiting_rooms) == 0  # every room drained and forgotten
    assert await _count(a_url, "acode") == len(replies["acode"])
    assert await _count(b_url, "bcode") == len(replies["bcode"])
    for url in (a_url, b_url):
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetch(_COUNTERS_OFF) == []
        finally:
            await conn.close()


async def _more(url: str, code: str, than: int) -> bool:
    return await _count(url, code) >= than
