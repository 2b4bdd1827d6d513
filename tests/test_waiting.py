"""An outage is waited out, never dead-lettered: a read-only database and a schema broken by
a bad migration hold the worker (visible in `refstream status` and in its metrics) until
the cause is gone; then every event is stored exactly once. And the trim survives the
races between its reads.

The database is this run's own (conftest), so changing its settings is changing nothing
anyone else uses; they are reset at the end of each test whatever happens.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from arq.connections import RedisSettings, create_pool

from ingest.contract import wire
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD
from refstream.embedded import free_port
from workers.consumer import trim
from workers.host.arq_redis import connect_arq

from ._procs import REFSTREAM, Procs, env_for
from .conftest import wait_for
from .test_e2e import TRACKED, fire


async def _status(procs: Procs) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM, "status", "--json", env=env_for(procs.settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, orjson.loads(out)


async def _metric(port: int, name: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        return "\n".join(line for line in (await r.text()).splitlines() if line.startswith(name))


async def _pending(redis: Any, keys: Keys) -> int:
    total = 0
    for stream in keys.streams:
        for g in await redis.xinfo_groups(stream):
            if g["name"] == GROUP.encode():
                total += g["pending"] + (g.get("lag") or 0)
    return total


@pytest.fixture
async def dbname(pg: asyncpg.Pool) -> AsyncIterator[str]:
    name = await pg.fetchval("SELECT current_database()")
    try:
        yield name
    finally:
        await pg.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


async def _blocked_then_resumed(procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys, reason: str, fix: Any) -> None:
    """Clicks accepted while the worker is held by ``reason``; ``fix`` ends the outage."""
    metrics_port = free_port()
    procs.start("work", REFSTREAM_METRICS_PORT=str(metrics_port), REFSTREAM_BATCH_SIZE="7")
    base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="100000")
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 40))

    async def blocked() -> Any:
        code, snap = await _status(procs)
        states = [w for w in snap["workers"] if w["state"] == "blocked"]
        return (code, states) if states else None

    code, states = await wait_for(blocked, timeout=60, what=f"the worker to report {reason}")
    assert code == 3 and states[0]["reasons"] == [reason]
    gauge = await _metric(metrics_port, "refstream_worker_blocked")
    assert f'refstream_worker_blocked{{reason="{reason}"}} 1.0' in gauge
    # the outage goes on for a while, with more traffic: nothing is set aside meanwhile
    assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 20))
    await asyncio.sleep(2)  # hold the outage for a while: there is nothing to await in it
    assert await redis.xlen(keys.dead) == 0
    assert await pg.fetchval("SELECT count(*) FROM events") == 0

    await fix()

    async def stored() -> bool:
        return await pg.fetchval("SELECT count(*) FROM events") == 60 and await _pending(redis, keys) == 0

    await wait_for(stored, timeout=30, what="the worker to catch up after the outage")
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'alice'") == 60
    assert await redis.xlen(keys.dead) == 0
    code, snap = await _status(procs)
    assert [w["state"] for w in snap["workers"]] == ["running"]
    assert 'reason="' + reason + '"} 0.0' in await _metric(metrics_port, "refstream_worker_blocked")
    assert "worker.blocked" in procs.logs() and "worker.resumed" in procs.logs()
    # one line per change of state, however many retries the outage took
    assert procs.logs().count('"worker.blocked"') == 1, procs.logs()


async def test_a_read_only_database_is_waited_out(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys, dbname: str):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    # as on a standby after a failover: every new session is read-only (SQLSTATE 25006)
    await pg.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')

    async def writable() -> None:
        await pg.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')

    await _blocked_then_resumed(procs, pg, redis, keys, "postgres_read_only", writable)


async def test_a_schema_error_is_waited_out(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    # a bad migration: a table the batch writes to is gone (SQLSTATE 42P01)
    await pg.execute("ALTER TABLE link_visitor_days RENAME TO link_visitor_days_moved")
    try:

        async def migrated_back() -> None:
            await pg.execute("ALTER TABLE link_visitor_days_moved RENAME TO link_visitor_days")

        await _blocked_then_resumed(procs, pg, redis, keys, "postgres_schema", migrated_back)
    finally:
        await pg.execute("ALTER TABLE IF EXISTS link_visitor_days_moved RENAME TO link_visitor_days")


class _AckBetweenReads:
    """A Redis client whose XPENDING is preceded by an XACK of everything pending: the race
    the trim must survive (XINFO said "pending", XPENDING then finds no minimum)."""

    def __init__(self, redis: Any, stream: str, ids: list[bytes]) -> None:
        self._redis, self._stream, self._ids = redis, stream, ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def xpending(self, stream: str, group: Any) -> Any:
        await self._redis.xack(self._stream, GROUP, *self._ids)
        return await self._redis.xpending(stream, group)


async def test_the_trim_survives_pending_entries_acked_between_its_reads(redis, keys: Keys):
    stream = keys.streams[0]
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {FIELD: b"x%d" % i}) for i in range(10)]
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=100)
    other = keys.streams[1]
    await redis.xgroup_create(other, GROUP, id="0", mkstream=True)
    other_ids = [await redis.xadd(other, {FIELD: b"y%d" % i}) for i in range(3)]
    await redis.xreadgroup(GROUP, "w", {other: ">"}, count=100)
    await redis.xack(other, GROUP, *other_ids)

    later = int(other_ids[-1].split(b"-")[0]) + 1000  # past every entry: only the groups hold the cut
    racing = _AckBetweenReads(redis, stream, ids)  # every command but XPENDING goes to the client
    removed = await trim.trim(racing, keys, retention_s=0, now_ms=later, exact=True)  # type: ignore[arg-type]  # a stand-in
    # the round went on past the race: both partitions trimmed up to what the group needs
    assert removed == {stream: 10, other: 3}
    assert await redis.xlen(stream) == 0 and await redis.xlen(other) == 0


class _Hanging:
    """A webhook receiver that never answers; it counts the requests it holds and the ones
    whose client gave up (a job slot freed)."""

    def __init__(self) -> None:
        self.held = 0
        self.ended = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.held += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.ended += 1
        raise AssertionError("unreachable")


async def test_reclaim_never_waits_behind_webhook_jobs(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    """Every arq job slot hangs on a webhook receiver; the entries a dead consumer left are
    still reclaimed and stored, before any of those deliveries has given up."""
    from workers.consumer import webhooks

    from .test_webhooks import lead, make_webhook, record

    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    hanging = _Hanging()
    app = web.Application()
    app.router.add_post("/hook", hanging.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    arq = await connect_arq(procs.settings)  # the workers' own: arq's keys under the test's prefix
    deliveries: list[str] = []
    try:
        assert procs.settings.secret_key is not None
        await make_webhook(pg, ws["workspace_id"], f"http://127.0.0.1:{port}/hook", procs.settings.secret_key)
        deliveries = await record(pg, [lead(ws["workspace_id"]) for _ in range(30)])
        assert await webhooks.enqueue(arq, deliveries, queue_name=keys.arq_queue) == 30

        # a consumer that read 25 clicks and died before acking them
        stream = keys.stream_for("alice")
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        base = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="100000")
        assert all(r == (200, TRACKED) for r in await fire(base, ["alice"] * 25))
        await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=100)

        procs.start("work", REFSTREAM_WEBHOOK_ALLOW_PRIVATE="true")  # its receiver is on loopback

        async def stored() -> bool:
            events: int = await pg.fetchval("SELECT count(*) FROM events")
            return events == 25

        await wait_for(stored, timeout=60, what="the ghost's entries to be reclaimed and stored")
        # arq's every job slot (10) was taken by a delivery that never finished meanwhile
        assert hanging.held >= 10 and hanging.ended == 0, (hanging.held, hanging.ended)
    finally:
        procs.stop_all()
        await runner.cleanup()
        await arq.aclose()


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
async def test_shutdown_runs_when_sigterm_cancelled_a_job_before_it_started(settings, redis):
    """On SIGTERM arq cancels its job tasks; one cancelled before its first step (a cron
    just enqueued, say) made arq's own close raise CancelledError and skip ``on_shutdown``,
    so the consumer's batch in flight was abandoned and the process exited 1 (found by
    tests/faults' SIGTERM scenario). The worker's close must run the shutdown regardless."""
    from workers.host.worker import ResilientWorker

    shut: list[bool] = []

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        shut.append(True)

    from workers.consumer import webhooks

    worker = ResilientWorker(
        functions=[webhooks.deliver_webhook_job],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=f"{settings.stream_prefix}:arq:queue",
        health_check_key=f"{settings.stream_prefix}:arq:queue:health-check",
        on_shutdown=on_shutdown,
        handle_signals=True,
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
    )
    worker._pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))

    async def job() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(job())
    task.cancel()  # cancelled before it ever ran, as arq's handle_sig does
    worker.tasks["cron:refresh_links:1"] = task
    await worker.close()
    assert shut == [True]


class _BrokenEnricher:
    """The worker's own code failing: for every event, or only for one User-Agent."""

    def __init__(self, only_ua: str | None = None) -> None:
        self.only_ua = only_ua

    def enrich(self, ip: Any, ua: Any, referrer: Any, policy: str) -> Any:
        if self.only_ua is None or ua == self.only_ua:
            raise TypeError("a bug")
        from workers.consumer.enrich import Enricher

        return Enricher().enrich(ip, ua, referrer, policy)

    def enrich_row(self, ip: Any, ua: Any, referrer: Any, policy: str) -> Any:  # what the store calls
        if self.only_ua is None or ua == self.only_ua:
            raise TypeError("a bug")
        from workers.consumer.enrich import Enricher

        return Enricher().enrich_row(ip, ua, referrer, policy)

    def device_of(self, ua: Any) -> Any:  # the devices a batch names, made before it (schema 16)
        return self._real().device_of(ua)

    def device_doc(self, device: Any) -> Any:
        return self._real().device_doc(device)

    def place_of(self, ip: Any) -> Any:  # the places a batch names, made before it (schema 17)
        return self._real().place_of(ip)

    def place_doc(self, place: Any) -> Any:
        return self._real().place_doc(place)

    def _real(self) -> Any:
        from workers.consumer.enrich import Enricher

        if not hasattr(self, "real"):
            self.real = Enricher()
        return self.real


async def test_a_bug_failing_every_entry_holds_the_batch_instead_of_dead_lettering_it(
    settings, redis, pg: asyncpg.Pool, keys: Keys, world
):
    from ingest.contract.events import Dialect, Envelope, EventType
    from workers.consumer.pipeline import Batch, Entry, Pipeline
    from workers.group.errors import BatchOutage

    def click(ua: str) -> Envelope:
        return Envelope(type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": "PARTNER123"}, user_agent=ua)

    stream = keys.stream_for("PARTNER123")
    envelopes = [click(f"Mozilla/5.0 (X11; Linux x86_64) Firefox/{100 + i}.0") for i in range(5)]
    entries: list[Entry] = [
        (await redis.xadd(stream, {FIELD: wire.to_blob(e)}), {FIELD: wire.to_blob(e)}) for e in envelopes
    ]

    broken = Pipeline(settings, redis, pg, _BrokenEnricher())  # type: ignore[arg-type]  # an Enricher's stand-in
    batch = Batch(keys.partition_for("PARTNER123"), stream, list(entries))
    with pytest.raises(BatchOutage) as caught:
        await broken.process(batch)
    assert caught.value.reason == "worker_error"
    assert await redis.xlen(keys.dead) == 0 and await pg.fetchval("SELECT count(*) FROM events") == 0

    # the fixed worker takes the same held batch: all stored
    await Pipeline(settings, redis, pg, _BrokenEnricher(only_ua="nobody")).process(batch)  # type: ignore[arg-type]  # a stand-in
    assert await pg.fetchval("SELECT count(*) FROM events") == 5 and await redis.xlen(keys.dead) == 0

    # one entry the code cannot handle, among good ones: that one is poison, alone
    odd = click("an odd agent")
    more = [click("Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0"), odd]
    entries = [(await redis.xadd(stream, {FIELD: wire.to_blob(e)}), {FIELD: wire.to_blob(e)}) for e in more]
    selective = Pipeline(settings, redis, pg, _BrokenEnricher(only_ua="an odd agent"))  # type: ignore[arg-type]  # a stand-in
    await selective.process(Batch(keys.partition_for("PARTNER123"), stream, entries))
    (dead,) = await redis.xrange(keys.dead)
    assert dead[1][b"error"].startswith(b"store: TypeError") and dead[1][FIELD] == wire.to_blob(odd)
    assert await pg.fetchval("SELECT count(*) FROM events") == 6


async def test_a_batch_that_keeps_meeting_outages_is_stored_in_smaller_parts(
    settings, redis, pg: asyncpg.Pool, keys: Keys, world
):
    """A batch too big for a statement timeout would meet the same "outage" for ever: after
    a few, it is stored in halves, quarters, ..., each part its own transaction."""
    from ingest.contract.events import Dialect, Envelope, EventType
    from workers.consumer.pipeline import SHRINK_AFTER, Batch, Entry, Pipeline

    stream = keys.stream_for("PARTNER123")
    envelopes = [
        Envelope(type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": "PARTNER123"}, user_agent="Mozilla/5.0")
        for _ in range(8)
    ]
    entries: list[Entry] = [
        (await redis.xadd(stream, {FIELD: wire.to_blob(e)}), {FIELD: wire.to_blob(e)}) for e in envelopes
    ]
    batch = Batch(keys.partition_for("PARTNER123"), stream, entries)
    batch.failures = SHRINK_AFTER + 1  # as the consumer counts them: 8 entries in parts of 2
    await Pipeline(settings, redis, pg).process(batch)
    assert await pg.fetchval("SELECT count(*) FROM events") == 8
    # now() is the transaction's start: one value per part
    assert await pg.fetchval("SELECT count(DISTINCT processed_at) FROM events") == 4
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 8


async def test_an_event_read_twice_in_one_tracked_batch_is_counted_one_attempt(
    settings, redis, pg: asyncpg.Pool, keys: Keys, world
):
    from ingest.contract.events import Dialect, Envelope, EventType
    from workers.consumer.pipeline import Batch, Entry, Pipeline

    stream = keys.stream_for("PARTNER123")
    e = Envelope(type=EventType.CLICK, dialect=Dialect.BIORE, payload={"code": "PARTNER123"}, user_agent="Mozilla/5.0")
    entries: list[Entry] = [
        (await redis.xadd(stream, {FIELD: wire.to_blob(e)}), {FIELD: wire.to_blob(e)}) for _ in range(2)
    ]
    p = keys.partition_for("PARTNER123")
    batch = Batch(p, stream, entries, tracked=True)
    pipeline = Pipeline(settings, redis, pg)
    pipeline._decode(batch)
    assert batch.good is not None
    counted: list[bytes] = []
    await pipeline._count_attempts(batch, batch.good, counted)
    assert list((await redis.hgetall(keys.attempts(p))).values()) == [b"1"]  # not 2 for one entry
    await pipeline.process(batch)
    assert await pg.fetchval("SELECT count(*) FROM events") == 1
    assert await redis.hlen(keys.attempts(p)) == 0
