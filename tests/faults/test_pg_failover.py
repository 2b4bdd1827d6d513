"""Postgres failover under load: a primary with a synchronous standby (streamed with
``pg_basebackup``), the processes' ``DATABASE_URL`` naming both hosts with
``target_session_attrs=read-write``. The primary is stopped as a crash would stop it
(``-m immediate``), the standby promoted (``pg_ctl promote``): the same edge and worker
processes go on writing to the new primary, and every event answered 2xx is stored
exactly once, counters equal their rows, nothing pending (I1-I3).

A synchronous standby has every commit the primary acknowledged, so nothing a worker
committed (and then XACKed) is lost; what a worker had not committed is still pending in
Redis and is delivered again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from ..conftest import wait_for
from ._plan import Plan
from ._servers import PgServer
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PgServer, PgServer]]:
    """A primary and its synchronous standby, of this test's own."""
    primary, standby = PgServer(), PgServer()
    try:
        primary.init()
        primary.start()
        await primary.ready()
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
            str(standby.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.data), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        with open(standby.data / "postgresql.conf", "a") as conf:  # the later line wins
            conf.write(f"\nport = {standby.port}\nunix_socket_directories = '{standby.sock}'\n")
        # the copy carries the primary's synchronous_standby_names (postgresql.auto.conf): once
        # promoted, with no standby of its own, every commit would wait for one for ever
        _asynchronous(standby)
        standby.start()
        await standby.ready()
        await wait_for(lambda: _sync(primary), timeout=60, what="the standby to be synchronous")
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()


def _asynchronous(server: PgServer) -> None:
    """No synchronous standby named in ``server``'s ALTER SYSTEM file (edited while it is down)."""
    auto = server.data / "postgresql.auto.conf"
    lines = auto.read_text().splitlines(keepends=True)
    auto.write_text("".join(line for line in lines if not line.startswith("synchronous_standby_names")))


async def _sync(primary: PgServer) -> bool:
    conn = await asyncpg.connect(primary.url)
    try:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") == 1
    finally:
        await conn.close()


async def test_primary_stopped_synchronous_standby_promoted(pair, fault_redis, plan: Plan, request):
    primary, standby = pair
    dsn = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{{database}}"
           "?target_session_attrs=read-write")  # fmt: skip
    stage = Stage(request.node.name, primary, fault_redis.url, plan, database_url=dsn)
    try:
        world = await stage.prepare(workers=2)
        async with stage.load(world) as load:
            await asyncio.sleep(plan.warmup_s)
            await stage.storing()
            before = await stage.check.event_count()
            stopped_at = time.monotonic()
            primary.stop("immediate")  # a crash: no shutdown checkpoint, sessions cut
            done = standby._as_server_user(str(standby.bin / "pg_ctl"), "promote", "-D", str(standby.data), "-w")
            assert done.returncode == 0, done.stderr.decode(errors="replace")
            promoted_in = time.monotonic() - stopped_at
            await wait_for(lambda: _grows(stage, before), timeout=60, what="commits on the promoted standby")
            resumed_in = time.monotonic() - stopped_at
            fault_end = await stage.fault_over()
            await asyncio.sleep(plan.tail_s)
        print(f"\npostgres failover: promoted {promoted_in:.1f}s after the stop; commits resumed"
              f" {resumed_in:.1f}s after it, by the same worker processes")  # fmt: skip
        # finish also fails on any worker that exited by itself: the same processes must go on
        await stage.finish("postgres failover (synchronous standby)", load.record.accepted, fault_end=fault_end,
                           refused=load.record.refused())  # fmt: skip
    finally:
        _asynchronous(primary)  # the old primary comes back for the stage's cleanup, alone
        await stage.close()


async def _grows(stage: Stage, before: int) -> bool:
    try:
        return await stage.check.event_count() > before
    except (OSError, asyncpg.PostgresError):
        return False
