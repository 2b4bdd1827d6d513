"""Real Redis and Postgres for every test.

Session: the configured servers (REDIS_URL, DATABASE_URL, else the default local ports),
or embedded ones started from pip packages when those do not answer. Choose with
REFSTREAM_TEST_SERVICES=auto|external|embedded; under CI=true the default is ``external``:
a missing service fails the run instead of being swapped silently.

Per run: a database of its own (created, migrated, dropped). Per test: its own key prefix
(deleted afterwards) and emptied tables, so no test sees another's data or anyone else's.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import ExitStack
from typing import Any

import asyncpg
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from ingest.contract import erasure
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import secretbox
from ingest.manage.db import migrate
from refstream import services as svc_mod
from refstream.embedded import EmbeddedError
from workers.consumer import partitions

from ._procs import Procs
from ._redis import PrivateRedis
from .faults._servers import FaultRedis

# property tests judge what the code answers, not how fast: on a loaded machine an example
# past Hypothesis's 200 ms deadline, or a slow data draw, failed a correct test
hypothesis_settings.register_profile("refstream", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("refstream")

TEST_RETENTION_DAYS = 36500  # tests write events dated years ago: no partition is ever dropped under them
RUN_ID = secrets.token_hex(4)
SECRET_KEY = secretbox.generate_key()
_TABLES = (
    "webhook_attempts, webhook_deliveries, webhooks, affiliate_milestones, milestones, daily_stats, events,"
    " link_visitor_days, event_dedupe, event_retention,"
    " customers, links, api_keys, affiliates, programs, workspaces,"
    " drop_stats, event_drops, drop_folds, event_flags, burst_flags, affiliate_ips"
)


def pytest_report_header(config: pytest.Config) -> str:
    return f"refstream services: {_mode()} (REFSTREAM_TEST_SERVICES), run id {RUN_ID}"


def _mode() -> str:
    default = "external" if os.environ.get("CI") == "true" else "auto"
    return os.environ.get("REFSTREAM_TEST_SERVICES", default)


# -- without the embedded extra (refstream[embedded]: no wheels for every Python and
# platform), what needs its servers or its redis-server binary says so in one line: the
# session stops when no servers answer; a test or module that needs the binary is skipped
# with that line as its reason (one summary line for all), or fails with it under CI=true.
_NO_EMBEDDED = re.compile(r"no embedded servers: .*")


def _no_embedded(text: str) -> str | None:
    found = _NO_EMBEDDED.findall(text)  # the last: a traceback shows the raising source line first
    return str(found[-1]) if found else None


def _one_line(report: pytest.CollectReport | pytest.TestReport, line: str) -> None:
    if os.environ.get("CI") == "true":
        report.longrepr = line
    else:
        report.outcome = "skipped"
        report.longrepr = (__file__, _one_line.__code__.co_firstlineno, f"Skipped: {line}")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    line = _no_embedded(str(report.longrepr)) if report.failed else None
    if line:
        _one_line(report, line)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    exc = call.excinfo.value if call.excinfo is not None else None
    line = _no_embedded(str(exc)) if isinstance(exc, EmbeddedError) and report.failed else None
    if line:
        _one_line(report, line)
    return report


DUMP_BEFORE_TIMEOUT_S = 8.0


def _dump_tasks(nodeid: str) -> None:
    """Every asyncio task's stack, on stderr (captured into the failing test's report): a
    test about to hit its timeout shows what each task waits on, which pytest-timeout's own
    dump (the threads') does not."""
    lines = [f"== {nodeid}: still running {DUMP_BEFORE_TIMEOUT_S:.0f}s before its timeout; asyncio tasks:"]
    # the other thread's loop: a diagnostic read of asyncio's private set of every loop's tasks
    for task in list(asyncio.tasks._all_tasks):  # type: ignore[attr-defined]  # private: not in typeshed
        if task.done():
            continue
        chain: list[str] = []
        coro = task.get_coro()
        while coro is not None and len(chain) < 40:  # the chain of awaits, outermost first
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None)
        lines.append(f"  {task.get_name()} cancelling={task.cancelling()}: {' -> '.join(chain)}")
    print("\n".join(lines), file=sys.stderr, flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    marker = item.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    timer = None
    if timeout > DUMP_BEFORE_TIMEOUT_S * 2:
        timer = threading.Timer(timeout - DUMP_BEFORE_TIMEOUT_S, _dump_tasks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.fixture(scope="session")
def services() -> Iterator[svc_mod.Services]:
    mode = _mode()
    with ExitStack() as stack:
        try:
            s = svc_mod.resolve(stack, force_embedded=mode == "embedded", strict=mode == "external")
        except EmbeddedError as exc:
            line = _no_embedded(str(exc))
            if line is None:
                raise
            pytest.exit(f"refstream tests: {line}", returncode=1)
        print(
            f"\nrefstream tests: redis {'embedded' if s.embedded_redis else 'external'} {s.redis_url},"
            f" postgres {'embedded' if s.embedded_postgres else 'external'} {s.postgres_url}",
            file=sys.stderr,
        )
        yield s
        # every test's keys went with its settings (``settings``): a key left under this run's
        # prefix outlived the test that made it, which fails the run (after it is deleted)
        left = _delete_keys(s.redis_url, f"rstest:{RUN_ID}:*")
        assert not left, f"{len(left)} keys outlived their tests in {s.redis_url}, e.g. {sorted(left)[:5]}"


@pytest.fixture(scope="session")
async def database_url(services: svc_mod.Services) -> AsyncIterator[str]:
    name = f"refstream_test_{RUN_ID}"
    server = await asyncpg.connect(svc_mod.with_database(services.postgres_url, "postgres"))
    await server.execute(f'CREATE DATABASE "{name}"')
    url = svc_mod.with_database(services.postgres_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        # today's partitions before any test inserts, as refstream migrate makes them
        await partitions.maintain(conn, retention_days=TEST_RETENTION_DAYS, dedupe_days=TEST_RETENTION_DAYS)
    finally:
        await conn.close()
    try:
        yield url
    finally:
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()


async def drop_database(postgres_url: str, name: str) -> None:
    """Drop a database a test made (server-level URL: ``services.postgres_url``)."""
    server = await asyncpg.connect(svc_mod.with_database(postgres_url, "postgres"))
    try:
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await server.close()


@pytest.fixture
async def scratch_url(services: svc_mod.Services) -> AsyncIterator[str]:
    """The URL of a database that does not exist (yet): whatever the test makes of it is
    dropped afterwards."""
    name = f"refstream_scratch_{RUN_ID}_{secrets.token_hex(4)}"
    try:
        yield svc_mod.with_database(services.postgres_url, name)
    finally:
        await drop_database(services.postgres_url, name)


@pytest.fixture(autouse=True)
def _salt_of_this_test() -> Iterator[None]:
    """The process's cached erasure salt (``ingest.contract.erasure.salt``) is one database
    family's: a directory and its shards share it, but a test's scratch or two-shard
    databases have their own. Forgotten before and after each test, so that no test digests
    its database under the salt an earlier test's databases cached in this process."""
    erasure.forget_salt()
    yield
    erasure.forget_salt()


@pytest.fixture
async def two_shards(services: svc_mod.Services) -> AsyncIterator[tuple[str, str]]:
    """Two databases that do not exist yet: the directory's and shard b's."""
    names = [f"refstream_shard_{RUN_ID}_{secrets.token_hex(4)}" for _ in range(2)]
    try:
        yield tuple(svc_mod.with_database(services.postgres_url, n) for n in names)  # type: ignore[misc]
    finally:
        for n in names:
            await drop_database(services.postgres_url, n)


_counter = iter(range(1, 1_000_000))


def _delete_keys(redis_url: str, pattern: str) -> list[str]:
    """Delete the keys ``pattern`` matches in the Redis at ``redis_url``, and name them. Best
    effort: a Redis that does not answer leaves them (and says nothing of them)."""
    client = sync_redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    deleted: list[str] = []
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                deleted += [k.decode(errors="replace") for k in batch]
                batch = []
        if batch:
            client.unlink(*batch)
            deleted += [k.decode(errors="replace") for k in batch]
    except sync_redis.RedisError:
        pass
    finally:
        client.close()
    return deleted


@pytest.fixture
def settings(services: svc_mod.Services, database_url: str, tmp_path: Any) -> Iterator[Settings]:
    """Settings for one test: its own key prefix, whose keys are deleted after everything
    that used the settings (the ``redis`` client, processes, apps) has stopped; short
    timings so tests run quickly."""
    prefix = f"rstest:{RUN_ID}:{next(_counter)}"
    yield Settings(
        redis_url=services.redis_url,
        database_url=database_url,
        stream_prefix=prefix,
        partitions=4,
        block_ms=200,
        claim_idle_ms=1000,
        archive_segment_s=0.5,  # below the claim idle time (an archiver refuses otherwise)
        reclaim_every_s=1,
        key_cache_s=0.5,
        secret_key=SECRET_KEY,
        spool_dir=str(tmp_path / "spool"),
        spool_drain_every_s=0.2,
        log_level="info",
        # test data is dated anywhere from 2024 on: no worker's housekeeping drops any of it
        # (tests/test_partitions.py runs the maintenance with retentions of its own)
        event_retention_days=TEST_RETENTION_DAYS,
        dedupe_retention_days=TEST_RETENTION_DAYS,
    )
    _delete_keys(services.redis_url, f"{prefix}:*")


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.stream_prefix, settings.partitions)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()  # the test's keys go with its ``settings``, after all that used them


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    from ingest.contract.connections import create_pg_pool

    pool = await create_pg_pool(settings, min_size=1, max_size=10)
    await pool.execute(f"TRUNCATE {_TABLES} CASCADE")
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def procs(settings: Settings, tmp_path: Any) -> Iterator[Procs]:
    """Real `refstream` processes for this test, stopped (and their logs kept) at the end."""
    p = Procs(settings, tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


async def wait_for(condition: Callable[[], Awaitable[Any]], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def edge(settings: Settings, redis: aioredis.Redis, pg: asyncpg.Pool) -> AsyncIterator[str]:
    """The edge app in this process, on a real port, against the real Redis and Postgres."""
    from ._world import start_edge

    runner, base = await start_edge(settings)
    try:
        yield base
    finally:
        await runner.cleanup()


@pytest.fixture
async def world(pg: asyncpg.Pool, redis: aioredis.Redis, keys: Keys) -> Any:
    """A workspace with a key, a program (60-day window), an affiliate and link PARTNER123."""
    from ._world import make_world

    return await make_world(pg, redis, keys)


@pytest.fixture
def drain(settings: Settings) -> Callable[[], Awaitable[dict[str, int]]]:
    """Run the worker's consumer until every partition is read and acked."""
    from workers.host.worker import drain as drain_streams

    return lambda: drain_streams(settings)


@pytest.fixture
def private_redis(tmp_path: Any) -> Iterator[PrivateRedis]:
    """A Redis of this test's own, to kill and start again on the same port."""
    r = PrivateRedis(tmp_path)
    r.start()
    try:
        yield r
    finally:
        if r.proc and r.proc.poll() is None:
            r.kill()


@pytest.fixture
async def private_fault_redis() -> AsyncIterator[Callable[..., Awaitable[FaultRedis]]]:
    """A Redis of this test's own, with options: ``await private_fault_redis("--maxmemory", "8mb")``."""
    started: list[FaultRedis] = []

    async def make(*options: str, binary: str | None = None) -> FaultRedis:
        server = FaultRedis(*options, binary=binary)
        started.append(server)
        server.start()
        await server.ready()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.destroy()
