"""A shard's primary crashes under load and its synchronous standby is promoted: the shard
is registered with both hosts (``target_session_attrs=read-write``), so the same worker
processes go on writing the shard's workspaces to the new primary, while the other shard
never stops; every event answered 200 is stored once, on its own shard."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from .._procs import Procs
from ..conftest import wait_for
from ._servers import PgServer
from .test_pg_failover import _asynchronous, _pair, _promote
from .test_shard_outage import _count, _more, all_stored_once, load, two_workspaces

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
        edge = await two_workspaces(procs, b_url)
        replies, stop, firing = load(edge)
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
        await all_stored_once(procs, redis, keys, replies, scratch_url, b_url)
    finally:
        procs.stop_all()
        _asynchronous(primary)
