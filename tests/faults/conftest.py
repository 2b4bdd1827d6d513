"""Fixtures of the fault suite: a Postgres and a Redis of its own for the session (the
scenarios break them; the machine's servers are never touched), and per test a ``Stage``:
its own key prefix and freshly migrated database, its processes, stopped afterwards.

``REFSTREAM_FAULTS=short`` (default) or ``full`` picks the fault durations (``_plan.py``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable

import pytest

from ._cluster import new_node
from ._plan import Plan
from ._plan import plan as _plan
from ._servers import FaultRedis, PgServer
from ._stage import FIGURES, Stage


def pytest_report_header(config: pytest.Config) -> str:
    return f"refstream fault suite: REFSTREAM_FAULTS={_plan().mode}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One figure line per scenario: accepted, stored, dead-lettered, duplicates, recovery."""
    if FIGURES:
        terminalreporter.section("refstream fault figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def plan() -> Plan:
    return _plan()


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[PgServer]:
    server = PgServer()
    try:
        server.init()
        server.start()  # from the main thread: the parent-death signal belongs to it
        await server.ready()
        print(f"\nfault suite: private postgres {server.bin} on {server.port}", file=sys.stderr)
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
async def fault_redis() -> AsyncIterator[FaultRedis]:
    server = FaultRedis()
    try:
        server.start()
        await server.ready()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def make_stage(
    request: pytest.FixtureRequest, pg_server: PgServer, fault_redis: FaultRedis, plan: Plan
) -> AsyncIterator[Callable[..., Stage]]:
    """``make_stage(redis_url=None, check_url=None, cluster=False)``: a Stage on the suite's
    servers (or another Redis; ``check_url``: the test's own way to it, past a proxy it
    breaks; ``cluster``: ``redis_url`` is a Redis Cluster node)."""
    stages: list[Stage] = []

    def make(redis_url: str | None = None, check_url: str | None = None, *, cluster: bool = False) -> Stage:
        # a Redis Cluster's node: arq's queue on the suite's plain fault Redis
        arq = fault_redis.url if cluster else None
        stage = Stage(request.node.name, pg_server, redis_url or fault_redis.url, plan, check_url, cluster_arq_url=arq)
        stages.append(stage)
        return stage

    try:
        yield make
    finally:
        for stage in stages:
            await stage.close()


@pytest.fixture
def stage(make_stage: Callable[..., Stage]) -> Stage:
    return make_stage()


@pytest.fixture
async def nodes() -> AsyncIterator[list[FaultRedis]]:
    """Six cluster-enabled redis-servers, not yet a cluster; a test may append more."""
    made: list[FaultRedis] = []
    try:
        for _ in range(6):
            made.append(new_node())
            await made[-1].ready()
        yield made
    finally:
        for node in made:
            node.destroy()
