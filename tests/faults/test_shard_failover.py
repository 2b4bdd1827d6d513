"""A shard's primary crashes under load and its synchronous standby is promoted: the shard
is registered with both hosts (``target_session_attrs=read-write``), so the same worker
processes go on writing the shard's workspaces to the new primary, while the other shard
never stops; every event answered 200 is stored once, on its own shard."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings

from .._procs import Procs
from ..conftest import wait_for
from ..test_e2e import TRACKED, fire
from ..test_shards import _COUNTERS_OFF
from ._servers import PgServer
from .test_pg_failover import _asynchronous, _pair, _promote
from .test_shard_outage import _count, _more

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


async def test_a_shards_standby_promoted_under_load(
    settings: Settings, tmp_path: Any, scratch_url: str, redis: Any
) -> None:
    async with _pair(synchronous=True) as (primary, standby):
        await _run(settings, tmp_path, scratch_url, redis, primary, standby)


async def _run(
    settings: Settings, tmp_path: Any, scratch_url: str, redis: Any, primary: PgServer, standby: PgServer
) -> None:
    s = settings.model_copy(update={"database_url": scratch_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    b_url = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/refstream"
        "?target_session_attrs=read-write"
    )
    try:
        await procs.cli("migrate")
        await procs.cli("shards", "add", "b", b_url)
        a = await procs.cli("workspace", "create", "A", "--shard", "default")
        b = await procs.cli("workspace", "create", "B", "--shard", "b")
        await procs.cli("link", "create", "--workspace", a["workspace_id"], "--code", "acode")
        await procs.cli("link", "create", "--workspace", b["workspace_id"], "--code", "bcode")
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
        procs.start("work")
        procs.start("work")
        replies: dict[str, list[tuple[int, object]]] = {"acode": [], "bcode": []}
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                for code in replies:
                    replies[code].extend(await fire(edge, [code] * 10, concurrency=4))

        firing = asyncio.create_task(load())
        try:
            await wait_for(lambda: _count(b_url, "bcode"), what="shard b storing")
            before = await _count(b_url, "bcode")
            stopped_at = time.monotonic()
            primary.stop("immediate")  # a crash: no shutdown checkpoint, sessions cut
            _promote(standby)
            await wait_for(lambda: _more(b_url, "bcode", before + 50), timeout=60, what="b committing, promoted")
            print(f"\nshard failover: b's commits resumed {time.monotonic() - stopped_at:.1f}s after the crash")
        finally:
            stop.set()
            await firing
        for code, got in replies.items():
            assert got and all(r == (200, TRACKED) for r in got), (code, [r for r in got if r != (200, TRACKED)][:3])
        await procs.cli("work", "--drain", timeout=180)
        for stream in keys.streams:
            (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            assert group["pending"] == 0
        assert await redis.scard(keys.waiting_rooms) == 0
        assert await _count(scratch_url, "acode") == len(replies["acode"])
        assert await _count(b_url, "bcode") == len(replies["bcode"])
        for url in (scratch_url, b_url):
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetch(_COUNTERS_OFF) == []
            finally:
                await conn.close()
    finally:
        procs.stop_all()
        _asynchronous(primary)
