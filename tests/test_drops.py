"""The edge's refusal tallies reach ``drop_stats`` exactly once: through the micro-batcher
into one Redis hash, folded by the worker, and a fold interrupted at any step (before or
after its Postgres commit) adds its tally once. The worker's duplicates are counted once,
its redeliveries never."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from ingest.contract.drops import NO_ID, DropTally, field, fold_key, folds_key, live_key
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge.batcher import RedisBatcher
from ingest.manage import admin
from workers.consumer import drops
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch
from workers.ops.reconcile import reconcile

from ._world import make_world

WS = "5f0e8a52-5d2b-4c36-9a57-1c2d3e4f5a6b"
LINK = "0b7c1f4e-2a3d-4e5f-8a9b-0c1d2e3f4a5b"


async def _stats(pg: asyncpg.Pool) -> dict[tuple[str, str, str], int]:
    rows = await pg.fetch("SELECT link_id, reason, source, n FROM drop_stats")
    return {(str(r["link_id"]), r["reason"], r["source"]): r["n"] for r in rows}


async def test_a_tally_goes_through_the_batcher_and_is_folded_once(settings: Settings, redis: Any, pg: asyncpg.Pool):
    batcher = RedisBatcher(redis)
    tally = DropTally(batcher, settings.stream_prefix)
    try:
        for _ in range(3):
            tally.note(WS, LINK, "rate_limited")
        tally.note(None, None, "unknown_code")
        with pytest.raises(ValueError):
            tally.note(WS, LINK, "bored")
        await tally.flush()
        await tally.flush()  # nothing left: nothing sent twice
    finally:
        await batcher.close()
    assert await drops.fold(redis, pg, settings.stream_prefix) == 4
    assert await drops.fold(redis, pg, settings.stream_prefix) == 0
    assert await _stats(pg) == {(LINK, "rate_limited", "edge"): 3, (NO_ID, "unknown_code", "edge"): 1}
    assert await redis.exists(live_key(settings.stream_prefix), folds_key(settings.stream_prefix)) == 0


async def test_a_fold_interrupted_after_its_commit_adds_nothing_more(settings: Settings, redis: Any, pg: asyncpg.Pool):
    prefix = settings.stream_prefix
    day = datetime.now(UTC).date().isoformat()
    # a fold that committed, then crashed before deleting its key
    done = fold_key(prefix, "done")
    await redis.hset(done, field(day, WS, LINK, "rate_limited"), 5)
    await redis.sadd(folds_key(prefix), done)
    await pg.execute("INSERT INTO drop_folds (fold_key) VALUES ($1)", done)
    # a fold that renamed, then crashed before its commit
    taken = fold_key(prefix, "taken")
    await redis.hset(taken, field(day, WS, LINK, "rate_limited"), 2)
    await redis.sadd(folds_key(prefix), taken)
    # and what the edges added since
    await redis.hincrby(live_key(prefix), field(day, WS, LINK, "rate_limited"), 1)
    await redis.hincrby(live_key(prefix), "not|a|field", 1)  # logged and skipped, never a crash

    assert await drops.fold(redis, pg, prefix) == 3
    assert await _stats(pg) == {(LINK, "rate_limited", "edge"): 3}
    assert await redis.smembers(folds_key(prefix)) == set()
    assert await drops.fold(redis, pg, prefix) == 0


async def test_a_duplicate_lead_counts_once_and_its_redelivery_never(pg: asyncpg.Pool, redis: Any, keys: Keys):
    """Through event_dedupe: the lead that loses its key's claim to another event is a
    duplicate (within a batch or across batches), a copy of a stored lead is not."""
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, "T")
        await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code="dup")

    def lead() -> Envelope:
        payload = {"code": "dup", "visitor_id": "v1", "external_id": "c1", "name": "Sign Up"}
        return Envelope(EventType.LEAD, Dialect.REFPORT, payload, workspace_id=ws["workspace_id"])

    first, second, third = lead(), lead(), lead()
    done = await write_batch(pg, [first, second])  # the second loses to the first in its own batch
    assert (done.inserted, done.duplicates) == (1, 1)
    again = await write_batch(pg, [first, second, third])  # a redelivery of both, and a third lead
    assert (again.inserted, again.duplicates) == (0, 3)

    def counted() -> Any:
        return pg.fetch("SELECT reason, source, n FROM drop_stats WHERE reason = 'duplicate'")

    assert [tuple(r) for r in await counted()] == [("duplicate", "worker", 2)]
    assert await pg.fetchval("SELECT leads FROM links WHERE code = 'dup'") == 1
    assert await reconcile(pg, fix=False) == []


async def test_a_click_batch_writes_its_drops_in_its_counters_statement(
    pg: asyncpg.Pool, redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
):
    """A batch that locks no row after its counters (clicks that make no customer) writes
    its drops in the counters' statement; one with a customer to make writes them last, on
    their own. The counts are the same either way, and reconcile's recount agrees."""
    world = await make_world(pg, redis, keys, code="fold")
    sent: list[str] = []
    original = asyncpg.Connection.execute

    async def execute(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append(" ".join(query.split()))
        status: str = await original(self, query, *args, **kwargs)
        return status

    monkeypatch.setattr(asyncpg.Connection, "execute", execute)

    def click(ip: str, ua: str, **payload: Any) -> Envelope:
        return Envelope(EventType.CLICK, Dialect.BIORE, {"code": "fold", **payload}, ip=ip, user_agent=ua)

    browser = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    enricher = Enricher()
    try:
        batch = [click("198.51.100.1", browser), click("198.51.100.2", "curl/8.5.0"), click("198.51.100.3", browser)]
        batch.append(click("198.51.100.4", browser, test_mode=True))
        assert (await write_batch(pg, batch, enricher)).inserted == 4
        on_their_own = [q for q in sent if q.startswith("INSERT INTO drop_stats")]
        assert on_their_own == []
        assert await _stats(pg) == {
            (world.link["id"], "bot", "worker"): 1,
            (world.link["id"], "test_mode", "worker"): 1,
        }
        # a click that makes a customer: the customers' rows come after the counters
        batch = [click("198.51.100.5", browser, visitor_id="v1"), click("198.51.100.6", "curl/8.5.0")]
        assert (await write_batch(pg, batch, enricher)).inserted == 2
        assert [q for q in sent if q.startswith("INSERT INTO drop_stats")] != []
    finally:
        enricher.close()
    assert await _stats(pg) == {(world.link["id"], "bot", "worker"): 2, (world.link["id"], "test_mode", "worker"): 1}
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'fold'") == 3
    assert await reconcile(pg, fix=False) == []
