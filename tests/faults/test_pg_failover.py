"""Postgres failover under load: a primary with a synchronous standby (streamed with
``pg_basebackup``), the processes' ``DATABASE_URL`` naming both hosts with
``target_session_attrs=read-write``. The primary is stopped as a crash would stop it
(``-m immediate``), the standby promoted (``pg_ctl promote``): the same edge and worker
processes go on writing to the new primary, and every event answered 2xx is stored
exactly once, counters equal their rows, nothing pending (I1-I3).

A synchronous standby has every commit the primary acknowledged, so nothing a worker
committed (and then XACKed) is lost; what a worker had not committed is still pending in
Redis and is delivered again.

An asynchronous standby may lack the last commits: the workers committed them on the old
primary and XACKed their entries, so Redis does not deliver them again by itself. The test
makes the standby lag for sure (the primary's WAL sender SIGSTOPped while the load goes
on, then SIGKILLed, so what it held is never sent), stops the primary, promotes the
standby, counts the events the failover lost (there must be some, or the test proved
nothing), and runs what the procedure says: ``refstream replay --since`` a time before
the lag. The entries are still in the streams (an hour's
retention), the replay stores exactly the missing ones (``inserted`` equals the count
lost) and counts nothing twice: then I1-I3 hold as after the synchronous failover."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ..conftest import wait_for
from ._plan import Plan
from ._servers import FaultRedis, PgServer
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PgServer, PgServer]]:
    """A primary and its synchronous standby, of this test's own."""
    async with _pair(synchronous=True) as servers:
        yield servers


@pytest.fixture
async def async_pair() -> AsyncIterator[tuple[PgServer, PgServer]]:
    """A primary and its asynchronous standby, of this test's own."""
    async with _pair(synchronous=False) as servers:
        yield servers


@contextlib.asynccontextmanager
async def _pair(*, synchronous: bool) -> AsyncIterator[tuple[PgServer, PgServer]]:
    primary, standby = PgServer(), PgServer()
    try:
        primary.init()
        primary.start()
        await primary.ready()
        if synchronous:
            conn = await asyncpg.connect(primary.url)
            try:
                await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()
        for d in (standby.data, standby.sock):  # empty: pg_basebackup fills the data directory
            d.mkdir(mode=0o700)
            standby._own(d)
        standby.log.touch()
        standby._own(standby.log)
        done = standby._as_server_user(
            str(standby.bin / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(standby.data),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        with open(standby.data / "postgresql.conf", "a") as conf:  # the later line wins
            conf.write(f"\nport = {standby.port}\nunix_socket_directories = '{standby.sock}'\n")
        # the copy carries the primary's synchronous_standby_names (postgresql.auto.conf): once
        # promoted, with no standby of its own, every commit would wait for one for ever
        _asynchronous(standby)
        standby.start()
        await standby.ready()
        await wait_for(
            lambda: _streaming(primary, "sync" if synchronous else "async"), timeout=60, what="the standby to stream"
        )
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()


def _asynchronous(server: PgServer) -> None:
    """No synchronous standby named in ``server``'s ALTER SYSTEM file (edited while it is down)."""
    auto = server.data / "postgresql.auto.conf"
    lines = auto.read_text().splitlines(keepends=True)
    auto.write_text("".join(line for line in lines if not line.startswith("synchronous_standby_names")))


async def _streaming(primary: PgServer, state: str) -> bool:
    conn = await asyncpg.connect(primary.url)
    try:
        streaming: int = await conn.fetchval("SELECT count(*) FROM pg_stat_replication WHERE sync_state = $1", state)
        return streaming == 1
    finally:
        await conn.close()


def _stage(
    primary: PgServer, standby: PgServer, fault_redis: FaultRedis, plan: Plan, request: pytest.FixtureRequest
) -> Stage:
    """A stage whose processes' DATABASE_URL names both servers, libpq's way."""
    dsn = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{{database}}"
        "?target_session_attrs=read-write"
    )
    return Stage(request.node.name, primary, fault_redis.url, plan, database_url=dsn)


def _promote(standby: PgServer) -> None:
    done = standby._as_server_user(str(standby.bin / "pg_ctl"), "promote", "-D", str(standby.data), "-w")
    assert done.returncode == 0, done.stderr.decode(errors="replace")


async def test_primary_stopped_synchronous_standby_promoted(pair, fault_redis, plan: Plan, request):
    primary, standby = pair
    stage = _stage(primary, standby, fault_redis, plan, request)
    try:
        world = await stage.prepare(workers=2)
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            before = await stage.check.event_count()
            stopped_at = time.monotonic()
            primary.stop("immediate")  # a crash: no shutdown checkpoint, sessions cut
            _promote(standby)
            promoted_in = time.monotonic() - stopped_at
            await wait_for(lambda: _grows(stage, before), timeout=60, what="commits on the promoted standby")
            resumed_in = time.monotonic() - stopped_at
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        print(
            f"\npostgres failover: promoted {promoted_in:.1f}s after the stop; commits resumed"
            f" {resumed_in:.1f}s after it, by the same worker processes"
        )
        # finish also fails on any worker that exited by itself: the same processes must go on
        await stage.finish(
            "postgres failover (synchronous standby)",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
        )
    finally:
        _asynchronous(primary)  # the old primary comes back for the stage's cleanup, alone
        await stage.close()


async def _grows(stage: Stage, before: int) -> bool:
    try:
        return await stage.check.event_count() > before
    except (OSError, asyncpg.PostgresError):
        return False


async def test_primary_stopped_asynchronous_standby_promoted_and_the_gap_replayed(
    async_pair, fault_redis, plan: Plan, request
):
    primary, standby = async_pair
    stage = _stage(primary, standby, fault_redis, plan, request)
    try:
        world = await stage.prepare(workers=2)
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            since = datetime.now(UTC) - timedelta(seconds=5)  # before the lag begins
            # the primary's WAL sender stopped: the standby falls behind, the primary does not wait;
            # then killed, so what it never sent is never sent, and the primary crashes
            sender = await _wal_sender(primary)
            os.kill(sender, signal.SIGSTOP)
            try:
                before = await stage.check.event_count()
                await wait_for(lambda: _grows(stage, before + 50), timeout=60, what="commits the standby lacks")
            finally:
                os.kill(sender, signal.SIGKILL)
            primary.stop("immediate")
            _promote(standby)
            after = await wait_for(lambda: _count(stage), timeout=60, what="the promoted standby to answer")
            await wait_for(lambda: _grows(stage, after), timeout=60, what="commits on the promoted standby")
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        await stage.check.wait_drained(time.monotonic(), plan.drain_timeout_s)
        lost = await stage.check.missing(load.record.accepted)
        assert len(lost) >= 50, f"the failover lost {len(lost)} commits: the standby did not lag"
        replayed = await stage.cli("replay", "--since", since.isoformat())
        assert replayed["totals"]["inserted"] == len(lost), replayed["totals"]
        print(
            f"\npostgres failover onto an asynchronous standby: {len(lost)} committed events lost,"
            f" all stored again by refstream replay --since"
        )
        await stage.finish(
            "postgres failover (asynchronous standby, then replay)",
            load.record.accepted,
            fault_end=fault_end,
            refused=load.record.refused(),
        )
    finally:
        await stage.close()


async def _wal_sender(primary: PgServer) -> int:
    conn = await asyncpg.connect(primary.url)
    try:
        pid = await conn.fetchval("SELECT pid FROM pg_stat_replication")
    finally:
        await conn.close()
    assert pid, "the primary has no WAL sender"
    return int(pid)


async def _count(stage: Stage) -> int | None:
    try:
        return await stage.check.event_count()
    except (OSError, asyncpg.PostgresError):
        return None
