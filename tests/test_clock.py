"""One clock decides (docs/guarantees.md: one clock decides): a process whose clock is off drops nothing, trims
nothing by time and stops no counter; an edge whose clock is off mints ids on Redis's day
(issue 24, defect 8). Each process is skewed with REFSTREAM_CLOCK_OFFSET_S."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from ingest.contract import clock, wire
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from workers.archive.store import TMP, LocalStore
from workers.consumer import trim
from workers.consumer.partitions import day_uuid, uuid_day

from ._procs import Procs
from ._redis import PrivateRedis
from ._world import BROWSER, make_world
from .conftest import wait_for
from .test_replay import append

YEAR_S = 365 * 86400


@pytest.fixture
def year_ahead() -> Iterator[None]:
    """This test process's clock a year ahead, as REFSTREAM_CLOCK_OFFSET_S sets it."""
    clock.configure(YEAR_S)
    try:
        yield
    finally:
        clock.configure(0)


def clicks(code: str, workspace_id: str, n: int, first: int) -> list[Envelope]:
    at = int(time.time() * 1000)
    return [
        Envelope(
            EventType.CLICK,
            Dialect.AFFITOR,
            {"code": code, "visitor_id": f"v{first + i}"},
            workspace_id,
            "81.2.69.160",
            BROWSER,
            event_id=uuid7(at + i),
            received_at_ms=at + i,
        )
        for i in range(n)
    ]


def logged(procs: Procs, event: str) -> bool:
    return re.search(rf'"event":\s*"{re.escape(event)}"', procs.logs()) is not None


async def test_a_worker_a_year_ahead_drops_nothing_and_counting_goes_on(
    settings: Settings, redis: Any, keys: Keys, tmp_path: Path, scratch_url: str
) -> None:
    s = settings.model_copy(
        update={"database_url": scratch_url, "event_retention_days": 30, "dedupe_retention_days": 30}
    )
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")  # today's partitions, on Postgres's day
    pool = await asyncpg.create_pool(scratch_url, min_size=1, max_size=2)
    try:
        world = await make_world(pool, redis, keys, code="A")
        await append(redis, keys, clicks("A", world.workspace_id, 5, 0))
        procs.start("work", REFSTREAM_CLOCK_OFFSET_S=str(YEAR_S))

        async def stored(n: int) -> bool:
            events: int = await pool.fetchval("SELECT count(*) FROM events")
            return events == n

        await wait_for(lambda: stored(5), timeout=60, what="the first five clicks stored")
        today = await pool.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        horizon = await pool.fetchval("SELECT horizon_id FROM event_retention")
        names = {r[0] for r in await pool.fetch("SELECT relname FROM pg_class WHERE relname LIKE 'events_p%'")}
        assert f"events_p{today:%Y%m%d}" in names

        # the worker's partition maintenance ran (at its start) and refused to drop a thing
        await wait_for(
            lambda: _true(logged(procs, "partitions.clock_skewed") or logged(procs, "partitions")),
            timeout=60,
            what="the worker's partition maintenance",
        )
        assert await pool.fetchval("SELECT count(*) FROM events") == 5
        assert logged(procs, "partitions.clock_skewed"), procs.logs()
        assert (
            await pool.fetchval("SELECT horizon_id FROM event_retention")
            == horizon
            == day_uuid(today - timedelta(days=30))
        )
        after = {r[0] for r in await pool.fetch("SELECT relname FROM pg_class WHERE relname LIKE 'events_p%'")}
        assert names <= after

        # and counting goes on
        await append(redis, keys, clicks("A", world.workspace_id, 3, 5))
        await wait_for(lambda: stored(8), timeout=60, what="three more clicks stored")
        assert await pool.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 8
    finally:
        procs.stop_all()
        await pool.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_trim_a_year_ahead_trims_nothing_by_time(redis: Any, keys: Keys, year_ahead: None) -> None:
    stream = keys.streams[0]
    ids = [await redis.xadd(stream, {FIELD: b"x"}) for _ in range(5)]
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=10)
    await redis.xack(stream, GROUP, *ids)  # every group acked: only the retention (an hour) keeps them
    with capture_logs() as logs:
        removed = await trim.trim(redis, keys, 3600, exact=True)
    assert removed == {} and await redis.xlen(stream) == 5
    assert [e for e in logs if e["event"] == "trim.clock_skewed"]
    clock.configure(0)
    assert await trim.trim(redis, keys, 0, exact=True) == {stream: 5}  # a clock that agrees trims


async def test_an_edge_a_year_ahead_mints_ids_on_redis_day_and_its_click_counts(
    procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    await make_world(pg, redis, keys, code="A")
    base = await procs.start_edge(REFSTREAM_CLOCK_OFFSET_S=str(YEAR_S))
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        async with http.post(f"{base}/api/v1/referral/click/A") as r:
            assert r.status == 200
    stream = keys.stream_for("A")
    [(entry_id, fields)] = await redis.xrange(stream)
    event_id = wire.from_entry(fields).event_id
    appended_ms = int(entry_id.split(b"-")[0])  # Redis's clock at the XADD
    assert abs((event_id.int >> 80) - appended_ms) < 300_000  # minted on Redis's time, not a year ahead
    await wait_for(lambda: _true(logged(procs, "clock.skewed")), what="the edge's clock.skewed line")  # batched lines

    await drain()
    today = await pg.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    assert uuid_day(event_id) == today
    assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", event_id) == 1
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 1
    received = await pg.fetchval("SELECT received_at FROM events WHERE event_id = $1", event_id)
    assert abs(received - datetime.now(UTC)) < timedelta(minutes=5)


async def test_an_edge_started_while_redis_is_down_mints_ids_on_postgres_day(
    procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """An edge three days behind, started while its Redis is dead, measures Postgres's clock
    instead: the click it spools is minted on today's date, so the lead that later names it
    is judged by its true age (generative seed 1115168296: such an id made a batch lead
    naming it ``invalid_click_id``, a refusal, instead of ``unavailable``)."""
    await make_world(pg, redis, keys, code="A")
    private_redis.kill()
    base = await procs.start_edge(
        REDIS_URL=private_redis.url,
        REFSTREAM_CLOCK_OFFSET_S=str(-3 * 86400),
        REFSTREAM_SPOOL_DIR=str(tmp_path / "spool"),
        REFSTREAM_SPOOL_DRAIN_EVERY_S="0.2",
    )
    await wait_for(
        lambda: _true(re.search(r'"following":\s*"postgres"', procs.logs()) is not None),
        what="the edge following Postgres's clock",
    )
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        async with http.post(f"{base}/api/v1/referral/click/A") as r:
            assert r.status == 200, await r.text()  # spooled
    private_redis.start()
    own = aioredis.Redis.from_url(private_redis.url)
    try:
        entries = await wait_for(lambda: own.xrange(keys.stream_for("A")), what="the spooled click drained")
    finally:
        await own.aclose()
    [(_, fields)] = entries
    minted_ms = wire.from_entry(fields).event_id.int >> 80
    assert abs(minted_ms - time.time() * 1000) < 300_000  # today's, not three days ago


async def test_a_clock_unmeasured_at_start_is_measured_within_seconds_of_redis_coming_back(
    private_redis: PrivateRedis,
) -> None:
    """Neither Redis nor a pool at start: the measurement is retried every second, not left
    to the next ``FOLLOW_EVERY_S`` (30 s) while ids are minted on a clock three days off."""
    private_redis.kill()
    client = aioredis.Redis.from_url(private_redis.url)
    clock.configure(-3 * 86400)
    following = await clock.start_following(client, 300)
    try:
        assert clock.following_s() == 0  # unmeasured: its own clock
        private_redis.start()
        await wait_for(lambda: _true(clock.following_s() > 2 * 86400), timeout=10, what="the clock measured")
        assert abs(clock.now() - time.time()) < 300
    finally:
        following.cancel()
        clock.configure(0)
        clock._set_following(0.0, 300)  # this test process follows nothing afterwards
        await client.aclose()


async def test_an_archiver_a_year_ahead_sweeps_no_write_in_progress(tmp_path: Path, year_ahead: None) -> None:
    """A crashed write's temporary file goes once ten minutes old by the disk's clock (its
    mtime beside the segment just written), never by this process's: another archiver's
    write in progress stays."""
    store = LocalStore(str(tmp_path))
    (tmp_path / "p").mkdir()
    in_progress = tmp_path / "p" / f"{TMP}abc-seg-2"
    in_progress.write_bytes(b"half a segment")
    crashed = tmp_path / "p" / f"{TMP}def-seg-0"
    crashed.write_bytes(b"left by a crash")
    old = time.time() - 3600
    os.utime(crashed, (old, old))
    await store.put("p/seg-1", b"a segment")
    assert in_progress.exists() and not crashed.exists()


_TIME_OF_DAY = {
    ("time", "time"),
    ("time", "time_ns"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
}
_TIME_OF_DAY |= {("date", "today")}


def _time_of_day_reads(source: str) -> list[int]:
    """The lines of ``source`` that read the time of day other than through ``clock``:
    ``time.time()``, ``datetime.now(...)`` and their kin, however imported."""
    import ast

    tree = ast.parse(source)
    names = {  # what a bare name stands for: ``from time import time`` makes ``time`` one
        alias.asname or alias.name: (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner = names.get(f.value.id, ("", f.value.id))[1]
            if (owner, f.attr) in _TIME_OF_DAY:
                lines.append(node.lineno)
        elif isinstance(f, ast.Name) and names.get(f.id) in {("time", "time"), ("time", "time_ns")}:
            lines.append(node.lineno)
    return lines


def test_no_module_but_the_clock_reads_the_time_of_day() -> None:
    """Every long-running process's time of day is ``clock``'s (a skewed host follows Redis;
    the fault tests' offsets apply): a module reading ``time.time()`` itself would see the
    host's clock, and the fault tests would not see what it does with a wrong one."""
    assert _time_of_day_reads(
        "import time\nfrom time import time as t\nfrom datetime import datetime as D\n"
        "time.time(); t(); D.now(); time.monotonic()\n"
    ) == [4, 4, 4]
    root = Path(__file__).resolve().parents[1]
    found = {
        f"{path.relative_to(root)}:{line}"
        for top in ("ingest", "workers", "refstream")
        for path in (root / top).rglob("*.py")
        if path != root / "ingest/contract/clock.py"
        for line in _time_of_day_reads(path.read_text())
    }
    assert not found, sorted(found)
