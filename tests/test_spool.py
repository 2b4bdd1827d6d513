"""The edge's spool against real Redis: what it keeps it replays exactly once, whatever
fails on the way (Redis down or full mid-drain, a delete refused, a full disk, two edges
on one directory); its size is read without touching the disk.

The end-to-end path (edge processes, an outage, a restart, the worker) is the last test
here; the fault scenarios (tests/faults/test_spool_*.py) put it under load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client import generate_latest

from ingest.contract import clicks
from ingest.contract.events import Envelope, uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from ingest.edge.metrics import EdgeMetrics
from ingest.link.errors import Rejected
from ingest.spool import spool as spool_module
from ingest.spool import store as spool_store
from ingest.spool.drain import SpoolDrainFailed
from ingest.spool.spool import Spool, SpoolFull
from refstream.embedded import free_port
from workers.ops import status

from ._procs import Procs
from ._redis import PrivateRedis
from ._world import BROWSER, call
from .conftest import wait_for
from .faults._servers import FaultRedis

REPO = Path(__file__).resolve().parent.parent


def envelope(size: int = 200) -> tuple[str, bytes]:
    """A marker (the event id) and an envelope-like payload carrying it."""
    marker = uuid.uuid4().hex
    return marker, orjson.dumps({"event_id": marker, "pad": "x" * size})


async def stored(redis: aioredis.Redis, stream: str) -> list[str]:
    """The markers in ``stream``, in order (duplicates kept)."""
    return [orjson.loads(f[FIELD])["event_id"] for _, f in await redis.xrange(stream)]


@pytest.fixture
def stream(keys: Keys) -> str:
    return keys.streams[0]


async def test_appends_drain_once_with_their_extra_commands(redis, keys: Keys, stream: str, tmp_path: Path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    try:
        click = clicks.ClickRef(clicks.mint(uuid7()), "alice", "ws", "v", 1_700_000_000_000)
        far = click.at_ms + 10 * 365 * 86400 * 1000
        sent = [envelope() for _ in range(20)]
        await asyncio.gather(
            *(
                spool.append(stream, e, [click.cache_command(keys, 10 * 365 * 86400)] if i == 0 else [])
                for i, (_, e) in enumerate(sent)
            )
        )
        assert spool.entries() == 20 and spool.size() > 20 * 200
        assert await spool.drain(redis) == 20
        assert sorted(await stored(redis, stream)) == sorted(m for m, _ in sent)
        assert orjson.loads(await redis.get(keys.click(click.click_id)))["c"] == "alice"  # the click cache entry
        now_ms = int(time.time() * 1000)
        assert abs(now_ms + await redis.pttl(keys.click(click.click_id)) - far) < 5000  # from the click
        assert (spool.entries(), spool.size()) == (0, 0)
        assert await spool.drain(redis) == 0
        assert len(await stored(redis, stream)) == 20
    finally:
        await spool.close()


async def test_the_cap_refuses_with_spool_full_and_keeps_nothing_of_it(redis, stream: str, tmp_path: Path):
    spool = Spool(tmp_path, max_bytes=1000)
    try:
        first, second = envelope(500), envelope(500)
        await spool.append(stream, first[1])
        with pytest.raises(SpoolFull):
            await spool.append(stream, second[1])
        assert isinstance(SpoolFull(), OSError)  # the routes' `except OSError` answers 503 for it
        assert await spool.drain(redis) == 1
        assert await stored(redis, stream) == [first[0]]
    finally:
        await spool.close()


async def test_size_and_metrics_never_touch_the_disk(stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    metrics = EdgeMetrics()
    metrics.watch_spool(spool)
    try:
        for _ in range(5):
            await spool.append(stream, envelope()[1])
        size = spool.size()

        def forbidden(*a: object, **kw: object) -> None:
            raise AssertionError("the spool's size must not list, stat or open anything")

        for target, name in (
            (os, "scandir"),
            (os, "listdir"),
            (os, "stat"),
            (sqlite3, "connect"),
            (pathlib.Path, "glob"),
            (pathlib.Path, "iterdir"),
            (pathlib.Path, "stat"),
        ):
            monkeypatch.setattr(target, name, forbidden)
        assert spool.size() == size and spool.entries() == 5
        text = generate_latest(metrics.registry).decode()
        monkeypatch.undo()
        assert f"refstream_spool_bytes {float(size)}" in text and "refstream_spool_entries 5.0" in text
        assert 'refstream_spool_errors_total{op="append"} 0.0' in text
    finally:
        await spool.close()


async def test_redis_down_for_many_ticks_creates_nothing_and_logs_once(stream: str, tmp_path: Path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        for _ in range(10):
            await spool.append(stream, envelope()[1])
        files = sorted(os.listdir(tmp_path))
        db = spool_store.path_in(tmp_path).stat().st_size
        with structlog.testing.capture_logs() as logs:
            spool.start(dead, every_s=0.01)
            await wait_for(lambda: _ge(spool.ticks, 60), timeout=30, what="60 drain ticks")
        assert set(os.listdir(tmp_path)) - set(files) <= {"drain.lock"}  # made once, by the first tick
        assert spool_store.path_in(tmp_path).stat().st_size == db
        assert spool.entries() == 10 and spool.drained == 0 and not spool.errors
        assert [e["event"] for e in logs] == ["spool.drain_waiting"]  # one line, not one per tick
    finally:
        await spool.close()
        await dead.aclose()


async def _ge(a: int, b: int) -> bool:
    return a >= b


async def test_a_drain_refused_halfway_resumes_without_duplicates(tmp_path: Path):
    server = FaultRedis("--maxmemory-policy", "noeviction")  # a Redis of this test's own, to fill
    server.start()
    await server.ready()
    redis = aioredis.Redis.from_url(server.url)
    spool = Spool(tmp_path, max_bytes=1 << 30)
    try:
        sent = [envelope(1000) for _ in range(1500)]
        await asyncio.gather(*(spool.append("s", e) for _, e in sent))
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used + 400_000)  # room for about a third
        with pytest.raises(Rejected, match=r"maxmemory|OOM") as refused:  # the link's, as the tree's
            await spool.drain(redis)
        assert refused.value.code == "OOM"
        halfway = await stored(redis, "s")
        assert 0 < len(halfway) < 1500 and len(set(halfway)) == len(halfway)
        assert spool.entries() == 1500 - len(halfway)  # what Redis confirmed is gone from the spool
        with pytest.raises(Rejected):
            await spool.drain(redis)  # still full: nothing sent twice
        again = await stored(redis, "s")
        assert again[: len(halfway)] == halfway and len(set(again)) == len(again)
        await redis.config_set("maxmemory", 0)
        await spool.drain(redis)
        everything = await stored(redis, "s")
        assert sorted(everything) == sorted(m for m, _ in sent)  # each once, none lost
        assert spool.entries() == 0
    finally:
        await spool.close()
        await redis.aclose()
        server.destroy()


async def test_a_failed_delete_is_retried_without_sending_again(
    redis, stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(spool_store, "BUSY_TIMEOUT_S", 0.05)
    spool, other = Spool(tmp_path, max_bytes=1 << 20), Spool(tmp_path, max_bytes=1 << 20)
    blocker = sqlite3.connect(spool_store.path_in(tmp_path), isolation_level=None, timeout=0.05)
    try:
        sent = [envelope() for _ in range(5)]
        for _, e in sent:
            await spool.append(stream, e)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the delete fails
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(SpoolDrainFailed):
                    await spool.drain(redis)
                assert await other.drain(redis) == 0  # the rows sent are held: nobody sends them again
            blocker.execute("ROLLBACK")
            await spool.drain(redis)
        assert sorted(await stored(redis, stream)) == sorted(m for m, _ in sent)  # once each
        assert spool.entries() == 0 and spool.errors["drain_delete"] == 3 and not spool.failing()
        events = [(e["event"], e.get("op")) for e in logs if e["event"].startswith("spool.")]
        assert events[0] == ("spool.failing", "drain_delete") and ("spool.recovered", "drain_delete") in events
        assert sum(e == ("spool.failing", "drain_delete") for e in events) == 1
    finally:
        blocker.close()
        await spool.close()
        await other.close()


async def test_a_spool_closed_while_a_drain_step_hangs_gives_its_lock_back_quietly(
    redis, stream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The edge closes its spool while a drain step waits (on the erasure ledger, as under a
    Postgres that does not answer): the step is cancelled and ends before the lock and the
    store are closed under it, so it gives the lock back itself, logs no failure, and the row
    stays for the next drain."""
    monkeypatch.setattr(spool_module, "DRAINER_CLOSE_S", 0.2)
    entered = asyncio.Event()

    async def unchecked(envelopes: list[Envelope]) -> dict[int, Envelope]:
        return {}

    @contextlib.asynccontextmanager
    async def hung_ledger() -> AsyncIterator[Callable[[list[Envelope]], Awaitable[dict[int, Envelope]]]]:
        entered.set()
        await asyncio.Event().wait()  # never answers
        yield unchecked

    spool, other = Spool(tmp_path, max_bytes=1 << 20), Spool(tmp_path, max_bytes=1 << 20)
    try:
        marker, e = envelope()
        await spool.append(stream, e)
        with structlog.testing.capture_logs() as logs:
            spool.start(redis, every_s=0.01, ledger=hung_ledger)
            await asyncio.wait_for(entered.wait(), 10)
            drainer = spool._drainer
            await spool.close()
        assert drainer is not None and drainer.done()
        assert [x for x in logs if x["log_level"] in ("error", "critical") or "exception" in x] == []
        assert await other.drain(redis) == 1  # the lock given back, the row still there
        assert await stored(redis, stream) == [marker]
    finally:
        await other.close()


async def test_two_spools_on_one_directory_drain_everything_once(redis, stream: str, tmp_path: Path):
    a, b = Spool(tmp_path, max_bytes=1 << 24), Spool(tmp_path, max_bytes=1 << 24)
    try:
        sent = [envelope() for _ in range(600)]

        async def fill(spool: Spool, part: list[tuple[str, bytes]]) -> None:
            for i in range(0, len(part), 20):
                await asyncio.gather(*(spool.append(stream, e) for _, e in part[i : i + 20]))

        async def drain_until_empty(spool: Spool) -> None:
            while True:
                await spool.drain(redis)
                if spool_store.usage(tmp_path).entries == 0 and filled.done():
                    return
                await asyncio.sleep(0)

        filled = asyncio.ensure_future(asyncio.gather(fill(a, sent[::2]), fill(b, sent[1::2])))
        await asyncio.gather(filled, drain_until_empty(a), drain_until_empty(b))
        assert sorted(await stored(redis, stream)) == sorted(m for m, _ in sent)
    finally:
        await a.close()
        await b.close()


EDGE_LIKE = """
import asyncio, sys, uuid, orjson, redis.asyncio as aioredis
from pathlib import Path
from ingest.spool import store as spool_store
from ingest.spool.spool import Spool
async def main(directory, url, stream, n):
    spool, redis = Spool(directory, max_bytes=1 << 30), aioredis.Redis.from_url(url)
    markers = [uuid.uuid4().hex for _ in range(n)]
    async def fill():
        for i in range(0, n, 10):
            await asyncio.gather(*(spool.append(stream, orjson.dumps({"event_id": m})) for m in markers[i:i + 10]))
    task = asyncio.ensure_future(fill())
    while not task.done() or spool_store.usage(Path(directory)).entries:
        await spool.drain(redis)
        await asyncio.sleep(0.001)
    await task
    await spool.close()
    await redis.aclose()
    print(orjson.dumps(markers).decode())
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_two_processes_on_one_directory_drain_everything_once(
    redis, settings: Settings, stream: str, tmp_path: Path
):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EDGE_LIKE, str(tmp_path), settings.redis_url, stream, "400"],
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    markers = [m for out, _ in outs for m in orjson.loads(out.splitlines()[-1])]  # after the log lines
    assert sorted(await stored(redis, stream)) == sorted(markers)  # 800, each once


FULL_DISK_WRITER = """
import asyncio, resource, sys, uuid, orjson
from ingest.spool.spool import Spool, SpoolError
async def main(directory, fsize):
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    spool = Spool(directory, max_bytes=1 << 30)
    ok, refused, errors = [], [], 0
    while len(refused) < 40:
        batch = [uuid.uuid4().hex for _ in range(8)]
        outcomes = await asyncio.gather(*(spool.append("s", orjson.dumps({"event_id": m, "pad": "x" * 600}))
                                          for m in batch), return_exceptions=True)
        for m, o in zip(batch, outcomes):
            if o is None:
                ok.append(m)
            else:
                assert isinstance(o, SpoolError), o
                refused.append(m)
    print(orjson.dumps({"ok": ok, "refused": refused, "errors": spool.errors["append"]}).decode())
    await spool.close()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[int]:
    """A tmpfs of ``size`` at ``path`` (yields 0), or, where mounting is refused, an
    RLIMIT_FSIZE for the writer (yields the limit): either way, a disk that fills."""
    path.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
        ).returncode
        == 0
    )
    try:
        yield 0 if mounted else 768 * 1024
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


async def test_a_full_disk_refuses_requests_and_keeps_nothing_of_them(redis, tmp_path: Path):
    with small_disk(tmp_path / "disk") as fsize:
        directory = tmp_path / "disk" / "spool"
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", FULL_DISK_WRITER, str(directory), str(fsize)],
            capture_output=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        out = orjson.loads(done.stdout.splitlines()[-1])  # after the log lines
        assert len(out["ok"]) > 100 and out["errors"] >= 5
        said = done.stdout + done.stderr  # SQLITE_FULL on a full disk; SQLITE_IOERR_WRITE (EFBIG) under the limit
        assert b"spool.failing" in said and (b"SQLITE_FULL" in said or b"SQLITE_IOERR" in said)
        spool = Spool(directory, max_bytes=1 << 30)
        try:
            while spool_store.usage(directory).entries:
                await spool.drain(redis)
            got = await stored(redis, "s")
            assert sorted(got) == sorted(out["ok"])  # every accepted event once, nothing refused
            if not fsize:  # the drain emptied the disk it filled: the spool takes events again
                await spool.append("s", envelope()[1])
        finally:
            await spool.close()
            await redis.delete("s")


def test_status_reports_a_spool_failure_as_a_breach(tmp_path: Path):
    conn = spool_store.connect(tmp_path)
    try:
        spool_store.record_error(conn, "append", "SQLITE_FULL: database or disk is full")
    finally:
        conn.close()
    usage = status.spool_usage(str(tmp_path))
    assert usage.error is not None and "append: SQLITE_FULL" in usage.error
    (breach,) = status._breaches([], status.Dead(0, None), status.Thresholds(), [], usage, None)
    assert breach.check == "spool"


def test_a_click_id_may_be_pending_only_if_recent_and_well_formed():
    now = 1_800_000_000_000
    fresh = clicks.mint(uuid7(now - 5_000))
    assert clicks.may_be_pending(fresh, now, 86400)
    assert not clicks.may_be_pending(clicks.mint(uuid7(now - 2 * 86400 * 1000)), now, 86400)  # too old
    # from an edge whose clock runs ahead: on its way, within the window either side
    assert clicks.may_be_pending(clicks.mint(uuid7(now + 3_600_000)), now, 86400)
    assert not clicks.may_be_pending(clicks.mint(uuid7(now + 2 * 86400 * 1000)), now, 86400)  # too far ahead
    assert not clicks.may_be_pending("clk_" + "0" * 32, now, 86400)  # not a UUIDv7
    assert not clicks.may_be_pending("clk_" + uuid.uuid4().hex, now, 86400)  # a v4
    assert not clicks.may_be_pending("abc", now, 86400)


async def test_a_lead_on_a_click_not_yet_known_is_retryable(edge: str, world, settings: Settings):
    bearer = {"Authorization": f"Bearer {world.api_key}"}
    old = clicks.mint(uuid7(1_600_000_000_000))  # 2020: no spool holds it
    for click_id, want in ((clicks.mint(uuid7()), 503), (old, 400), ("clk_" + "0" * 32, 400), ("nope", 400)):
        lead = {"clickId": click_id, "eventName": "Sign Up", "customerExternalId": "u1"}
        status_, out, headers = await call("POST", f"{edge}/api/track/lead", json=lead, headers=bearer)
        assert status_ == want, (click_id, out)
        if want == 503:
            assert headers.get("Retry-After") and out["error"]["code"] == "SERVICE_UNAVAILABLE"
        else:
            assert out["error"]["code"] == "INVALID_CLICK_ID"
    batch = [
        {"type": "lead", "clickId": clicks.mint(uuid7()), "eventName": "x", "customerExternalId": "u2"},
        {"type": "lead", "clickId": old, "eventName": "x", "customerExternalId": "u3"},
    ]
    status_, out, _ = await call("POST", f"{edge}/v1/events/batch", json=batch, headers=bearer)
    assert status_ == 200 and [r["error"] for r in out["results"]] == ["unavailable", "invalid_click_id"]


async def clicks_to(base: str, n: int) -> list[int]:
    return [
        (await call("POST", f"{base}/api/v1/referral/click/alice", headers={"User-Agent": BROWSER}))[0]
        for _ in range(n)
    ]


async def test_spool_through_a_redis_outage_and_an_edge_restart(
    settings: Settings, private_redis: PrivateRedis, pg: asyncpg.Pool, tmp_path: Path
):
    """Redis goes away under a running edge: public clicks are still accepted (into the
    spool), authenticated routes answer 503; an edge restart loses nothing spooled; when
    Redis is back the spool drains and the worker counts every click exactly once."""
    own = settings.model_copy(update={"redis_url": private_redis.url, "click_rate_limit_per_min": 1000})
    procs = Procs(own, tmp_path)
    spool = Path(own.spool_dir)
    try:
        ws = await procs.cli("workspace", "create", "Acme")
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000")
        procs.start("work")

        async def counted(n: int) -> bool:
            clicks: int = await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'")
            return clicks == n

        assert await clicks_to(edge, 20) == [200] * 20
        await wait_for(lambda: counted(20), timeout=60, what="the first clicks")

        private_redis.kill()
        assert await clicks_to(edge, 30) == [200] * 30  # accepted: committed before each 200
        status_, out, headers = await call(
            "POST",
            f"{edge}/v1/track/click",
            json={"ref": "alice"},
            headers={"Authorization": f"Bearer {ws['api_key']}"},
        )
        assert (status_, headers.get("Retry-After")) == (503, "1"), out
        assert spool_store.usage(spool).entries == 30

        # the edge restarts while Redis is still down: the spool survives, and grows
        procs.running[0].terminate()
        assert procs.running[0].wait(20) == 0
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000")
        assert await clicks_to(edge, 10) == [200] * 10
        assert spool_store.usage(spool).entries == 40

        private_redis.start()  # empty: the spool is replayed into fresh streams
        await wait_for(lambda: counted(60), timeout=60, what="the spool to drain and the worker to count it")

        async def spool_empty() -> bool:
            return spool_store.usage(spool).entries == 0

        await wait_for(spool_empty, timeout=30, what="the spool to empty")
        await procs.cli("work", "--drain")
        assert await counted(60)  # every click once: none lost, none twice
        assert await pg.fetchval("SELECT count(*) FROM events") == 60
    finally:
        procs.stop_all()


# processes that open one new spool directory at the same instant (edge processes started
# together): each waits for the given wall-clock time, then opens it
_OPEN_AT = """
import pathlib, sys, time
from ingest.spool import store as spool_store
at = float(sys.argv[2])
while time.time() < at:
    pass
spool_store.connect(pathlib.Path(sys.argv[1])).close()
"""


def test_processes_opening_one_new_spool_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new file to WAL: SQLite refuses one of two processes doing it together at
    once, without its busy wait ("database is locked"); the refused one tries again. (Before,
    18 of 180 such openings failed in one measurement; a round is not certain to race.)"""
    for round_ in range(25):
        directory = tmp_path / f"spool{round_}"
        at = f"{time.time() + 0.4:.6f}"
        procs = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(directory), at], cwd=REPO, stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
