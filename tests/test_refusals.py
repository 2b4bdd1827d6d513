"""A refusal is never counted (docs/guarantees.md, what an answer means), at ``REFSTREAM_ACK_DURABILITY=replicas:1``
with no replica, against a Redis and an edge of the test's own: what the primary holds short
of the level is spooled under its event id and answered 2xx, an Idempotency-Key waits for the
level like any event, what is refused (nothing sent) is never stored, and an append the
spool cannot keep either is answered "may be stored" (503, ``Refstream-Outcome: unknown``),
which a retry with the same key resolves to one event."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

from ingest.contract.errors import Unreplicated
from ingest.contract.settings import Settings
from ingest.spool import store as spool_store
from ingest.spool.spool import Spool
from workers.host.worker import drain as drain_streams

from ._world import World, call, start_edge
from .conftest import wait_for
from .faults._sentinel import wait_in_sync
from .faults._servers import FaultRedis

# Redis servers of its own: the same whichever servers the suite uses (first pass only)
pytestmark = pytest.mark.once

FULL = 1 << 16  # REFSTREAM_SPOOL_MAX_BYTES at its least
OUTCOME, EVENT_ID = "Refstream-Outcome", "Refstream-Event-Id"  # a "may be stored" 503's headers
Answers = dict[str, tuple[int, Any, dict[str, str]]]


def own(settings: Settings, redis_url: str, spool: Path, **update: Any) -> Settings:
    return settings.model_copy(update={"redis_url": redis_url, "spool_dir": str(spool), **update})


def replicas_1(settings: Settings, primary: FaultRedis, spool: Path, **update: Any) -> Settings:
    return own(settings, primary.url, spool, ack_durability="replicas:1", ack_wait_ms=100, **update)


async def affixo(base: str, world: World, visitor: str, key: str | None = None) -> tuple[int, Any, dict[str, str]]:
    """An Affixo click naming its visitor (the row it makes is found by it); keyed or not."""
    headers = {"Authorization": f"Bearer {world.api_key}", **({"Idempotency-Key": key} if key else {})}
    return await call(
        "POST", f"{base}/v1/track/click", json={"ref": "PARTNER123", "visitor_id": visitor}, headers=headers
    )


async def stored(pg: asyncpg.Pool) -> Counter[str]:
    """Affixo event rows per visitor."""
    return Counter(r["visitor_id"] for r in await pg.fetch("SELECT visitor_id FROM events WHERE dialect = 'affixo'"))


def accepted(answers: Answers) -> Counter[str]:
    """What the rows must be: one per 2xx, and here (one copy of each key, kept in the spool)
    one per "may be stored"; none for a refusal."""
    return Counter(
        {
            visitor: 1
            for visitor, (status, _, headers) in answers.items()
            if status == 200 or headers.get(OUTCOME) == "unknown"
        }
    )


async def spool_empty(directory: Path) -> bool:
    return spool_store.usage(directory).entries == 0


@contextlib.asynccontextmanager
async def full_spool(directory: Path) -> AsyncIterator[None]:
    """A spool at its cap (``FULL``) that no edge drains: this process holds its drain lock."""
    filler = Spool(directory, max_bytes=FULL)
    await filler.append("filler", b"x" * (FULL - 32))
    await filler.close()
    fd = os.open(directory / spool_store.LOCK, os.O_RDWR | os.O_CREAT, 0o644)

    async def locked() -> bool:  # never a blocking flock: an edge's drainer in this loop may hold it for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    await wait_for(locked, what="the spool's drain lock")
    try:
        yield
    finally:
        os.close(fd)


async def send_both_kinds(base: str, world: World, rounds: int) -> Answers:
    """Unkeyed and keyed clicks, one after another: each answered 200 or 503. An unkeyed one
    is never "may be stored" (the spool keeps what the primary holds); a keyed one the
    primary holds short of the level is (a failover could let another copy of the key be
    the one stored): never 200."""
    answers: Answers = {}
    for n in range(rounds):
        for key in (None, f"key-{n}"):
            visitor = f"v{n}-{'keyed' if key else 'plain'}"
            answers[visitor] = answer = await affixo(base, world, visitor, key)
            assert answer[0] in (200, 503), answer
            if key is None:
                assert OUTCOME not in answer[2], answer
            else:
                assert answer[0] == 503, answer
    return answers


async def test_short_of_replicas_what_is_refused_is_never_stored(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    # issue 24, defect 4: a 503 whose XADD the primary had applied was counted all the same
    primary = await private_fault_redis()
    mine = replicas_1(settings, primary, tmp_path / "spool")
    runner, base = await start_edge(mine)
    try:
        answers = await send_both_kinds(base, world, 6)
        await private_fault_redis("--replicaof", "127.0.0.1", str(primary.port))
        await wait_in_sync(primary, 1)
        await wait_for(lambda: spool_empty(tmp_path / "spool"), timeout=30, what="the spool to drain")
    finally:
        await runner.cleanup()
    await drain_streams(mine)
    assert await stored(pg) == accepted(answers), answers
    assert answers["v0-plain"][0] == 200  # the first was sent: in the primary, and spooled


async def test_short_of_replicas_every_2xx_survives_the_loss_of_the_primary(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    # issue 24, defect 2: a keyed click was answered 200 without the durability wait
    primary = await private_fault_redis()
    mine = replicas_1(settings, primary, tmp_path / "spool")
    runner, base = await start_edge(mine)
    try:
        answers = await send_both_kinds(base, world, 4)
        # the primary is lost with all that no replica acknowledged, as when Sentinel
        # promotes a replica that had none of it: an empty server on the same address
        primary.kill()
        primary.start()
        await primary.ready()
        await private_fault_redis("--replicaof", "127.0.0.1", str(primary.port))
        await wait_in_sync(primary, 1)
        await wait_for(lambda: spool_empty(tmp_path / "spool"), timeout=30, what="the spool to drain")
    finally:
        await runner.cleanup()
    await drain_streams(mine)
    assert await stored(pg) == accepted(answers), answers  # every 2xx from the spool, once


async def test_a_may_be_stored_answer_retried_with_its_key_counts_once(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    primary = await private_fault_redis()
    mine = replicas_1(settings, primary, tmp_path / "spool", spool_max_bytes=FULL)
    async with full_spool(tmp_path / "spool"):
        runner, base = await start_edge(mine)
        try:
            status, body, headers = await affixo(base, world, "maybe", "key-maybe")
            # in the primary, short of the level, and the spool is full: neither accepted nor refused
            assert status == 503 and headers.get(OUTCOME) == "unknown", (status, body, headers)
            assert headers["Retry-After"] == "1" and body == {"error": "unavailable"}
            assert EVENT_ID not in headers  # a keyed copy: the one stored may be another's

            await private_fault_redis("--replicaof", "127.0.0.1", str(primary.port))
            await wait_in_sync(primary, 1)

            async def retried() -> tuple[int, Any, dict[str, str]] | None:
                answer = await affixo(base, world, "maybe", "key-maybe")
                assert answer[0] in (200, 503), answer  # 503 until a probe finds the replica
                return answer if answer[0] == 200 else None

            status, body, headers = await wait_for(retried, timeout=30, what="the retry to be answered 200")
            assert headers.get("Idempotent-Replayed") == "true" and body["visitor_id"] == "maybe"
        finally:
            await runner.cleanup()
    await drain_streams(mine)
    assert await stored(pg) == Counter(["maybe"])  # the first copy's, once


async def test_short_of_replicas_a_worker_stores_nothing_a_failover_could_lose(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    # issue 24, the generative test's seed 127853501: a keyed click the primary held short of
    # replicas:1 (answered "may be stored") was read and stored by a worker; the failover lost
    # it from Redis, the client's retry to another edge made a new copy, answered 200 with its
    # own click id, and the workers kept the first copy under the key: the 200 named an event
    # that was never stored
    primary = await private_fault_redis()
    one = replicas_1(settings, primary, tmp_path / "spool-1", spool_max_bytes=FULL)
    other = replicas_1(settings, primary, tmp_path / "spool-2")
    runner_one, base_one = await start_edge(one)
    runner_other, base_other = await start_edge(other)
    click = {"affiliate_url": "https://yoursite.com/?aff=PARTNER123", "referrer_url": "https://a.test/once"}
    headers = {"Idempotency-Key": "the-key"}
    with structlog.testing.capture_logs() as logs:
        worker = asyncio.create_task(drain_streams(one))
        try:
            async with full_spool(tmp_path / "spool-1"):  # the copy is in the primary only
                first = await call("POST", f"{base_one}/api/v1/track/click", json=click, headers=headers)
            assert first[0] == 503 and first[2].get(OUTCOME) == "unknown", first
            await wait_for(lambda: _unreplicated(logs), what="the worker to find what it read unreplicated")
            assert await pg.fetchval("SELECT count(*) FROM events WHERE dialect = 'affitor'") == 0
            # the failover: a replica that had none of it takes the primary's place
            primary.kill()
            primary.start()
            await primary.ready()
            await private_fault_redis("--replicaof", "127.0.0.1", str(primary.port))
            await wait_in_sync(primary, 1)

            async def retried() -> tuple[int, Any, dict[str, str]] | None:  # the client, to the other edge
                answer = await call("POST", f"{base_other}/api/v1/track/click", json=click, headers=headers)
                return answer if answer[0] == 200 else None

            again = await wait_for(retried, what="the retry to be accepted")
            await asyncio.wait_for(worker, 60)
        finally:
            worker.cancel()
            await runner_one.cleanup()
            await runner_other.cleanup()
    await drain_streams(other)
    rows = await pg.fetch("SELECT event_id FROM events WHERE dialect = 'affitor'")
    assert [f"clk_{r['event_id'].hex}" for r in rows] == [again[1]["click_id"]], (rows, again)  # the 200's event


async def _unreplicated(logs: list[MutableMapping[str, Any]]) -> bool:
    return any(e.get("event") == "consumer.read_failed" and isinstance(e.get("error"), Unreplicated) for e in logs)
