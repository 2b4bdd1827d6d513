"""An erasure's sweep reaches every idempotency record of the person's keyed events
(``workers.ops.erasure_redis.answers``), wherever the partition count of the moment put it
and whichever filing names it (the generative test's seed 376051469: a keyed Affixo
conversion answered 503 three times and then 200, a partition count changed, and after the
sweeps the key's record still named the erased customer)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis import asyncio as redis_asyncio

from ingest.contract import erasure_index, layout, wire
from ingest.contract.events import uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.spool.spool import Spool
from ingest.spool.store import Once
from workers.ops import erasure

from ._world import World, call, start_edge
from .conftest import wait_for
from .faults._servers import FaultRedis
from .test_erasure import erase_key
from .test_seed_004_refport import lead_body, new_click

WINDOW_MS = 60_000


async def _record(redis: Any, keys: Keys, world: World, external: str) -> str:
    """The one record of the workspace's that names ``external`` (a test may scan)."""
    names = [
        k.decode()
        async for k in redis.scan_iter(match=f"{keys.prefix}:idk:*{world.workspace_id}:*")
        if external.encode() in (await redis.get(k) or b"")
    ]
    assert len(names) == 1, names
    return str(names[0])


def _other_count(routing: str, keys: Keys, partition: int) -> int:
    """A count above the current one under which ``routing`` goes to another partition."""
    return next(n for n in range(keys.partitions + 1, 64) if keys.partition_for(routing, n) != partition)


async def _erase(edge: str, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, external: str) -> None:
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{external}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out


async def test_a_keyed_leads_record_unfiled_is_reached_after_a_partition_count_change(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """A keyed lead's record whose filing is lost (a full Redis refuses the index's ZADD
    beside the script that went in, or an edge that filed none): the sweep knows the key by
    the digest its row carries, and the partition count changed since the record was
    written. Its record was looked for only in the partition the current count gives."""
    external = f"cust-{secrets.token_hex(4)}"
    signed = lead_body(await new_click(edge), customerExternalId=external, customerEmail=f"{external}@example.com")
    headers = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": f"k-{secrets.token_hex(4)}"}
    status, led, _ = await call("POST", f"{edge}/api/track/lead", json=signed, headers=headers)
    assert status == 200, led
    await drain()
    record = await _record(redis, keys, world, external)
    assert await redis.delete(keys.answers(world.workspace_id)) == 1  # the filing lost
    code = await pg.fetchval(
        "SELECT l.code FROM events e JOIN links l ON l.id = e.link_id WHERE e.customer_external_id = $1", external
    )
    n = _other_count(code, keys, Keys.record_partition(record) or 0)
    await layout.set_count(redis, keys, keys.partitions, n, window_ms=WINDOW_MS)
    await _erase(edge, pg, redis, keys, world, external)

    swept = await erasure.sweep(pg, redis, Keys(settings.stream_prefix, n), None)
    assert swept.answers_rewritten == 1, swept
    raw = await redis.get(record)
    assert raw is not None and external.encode() not in raw, raw


async def test_a_keyed_sales_record_that_a_drains_filing_names_elsewhere_is_reached(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any, tmp_path: Path
) -> None:
    """Seed 376051469's shape: a keyed Affixo conversion appended (its record where the count
    of the moment put it), its filing lost beside it, and the copy the edge spooled when it
    could not tell the outcome drained after the partition count changed: its script finds
    the key's record where the earlier count put it, and the drain files the stored event
    under the partition it routed to, where no record is. No row keeps a sale's key: the
    sweep read the index's partition alone, and the record kept the customer."""
    external = f"cust-{secrets.token_hex(4)}"
    body = {"customer_id": external, "amount": 4900, "currency": "usd"}
    headers = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": f"k-{secrets.token_hex(4)}"}
    status, sold, _ = await call("POST", f"{edge}/v1/track/conversion", json=body, headers=headers)
    assert status == 200, sold
    record = await _record(redis, keys, world, external)
    before = Keys.record_partition(record)
    assert before is not None
    entries = await redis.xrange(keys.stream(before))
    (envelope,) = [e for _, f in entries if str((e := wire.from_entry(f)).event_id) == sold["conversion_id"]]
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE event_id = $1", envelope.event_id) == 1
    assert await redis.delete(keys.answers(world.workspace_id)) == 1  # the filing lost
    routing = envelope.routing_key()
    assert routing is not None
    n = _other_count(routing, keys, before)
    await layout.set_count(redis, keys, keys.partitions, n, window_ms=WINDOW_MS)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    try:
        once = Once(record, await redis.get(record), WINDOW_MS)
        assert await spool.append(keys.stream(before), wire.to_blob(envelope), once=once) is None
        spool._layout = layout.Watch(redis, Keys(settings.stream_prefix, n), n)  # as the edge's drain follows it
        assert await spool.drain(redis) == 1
    finally:
        await spool.close()
    filed = [erasure_index.parse_answer(m) for m in await redis.zrange(keys.answers(world.workspace_id), 0, -1)]
    after = keys.partition_for(routing, n)
    assert [(f[0], f[1]) for f in filed if f] == [(envelope.event_id.hex, after)], filed
    assert not await redis.exists(record.replace(f":idk:{{{before}}}:", f":idk:{{{after}}}:"))
    await _erase(edge, pg, redis, keys, world, external)

    swept = await erasure.sweep(pg, redis, Keys(settings.stream_prefix, n), None)
    assert swept.answers_rewritten == 1, swept
    raw = await redis.get(record)
    assert raw is not None and external.encode() not in raw, raw


async def test_a_keyed_records_filing_reaches_redis_before_its_script(
    settings: Settings,
    world: World,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    """The old edge sent a keyed event's record filing after the script that writes the
    record: a Redis the append filled (``noeviction``) refused the filing, and the record,
    written, was filed nowhere, out of the sweep's reach (the generative test's seed
    376051469 kept a keyed sale's answer naming its erased customer). The filing now goes
    first in the round trip: a Redis that took the script took its filing before it. Read
    as Redis received them (MONITOR, on a Redis of the test's own): the batch route's
    items and a single keyed lead, and the fingerprint entry a click's visitor sets."""
    server = await private_fault_redis()
    keys = Keys(settings.stream_prefix, settings.partitions)
    runner, edge = await start_edge(settings.model_copy(update={"redis_url": server.url, "spool_dir": str(tmp_path)}))
    watcher = redis_asyncio.Redis.from_url(server.url)
    seen: list[str] = []
    try:
        async with watcher.monitor() as m:
            await m.connect()

            async def watch() -> None:
                async for c in m.listen():
                    seen.append(str(c["command"]))

            watching = asyncio.create_task(watch())
            auth = {"Authorization": f"Bearer {world.api_key}"}
            body = lead_body(await new_click(edge), customerExternalId=f"cust-{secrets.token_hex(4)}")
            status, led, _ = await call(
                "POST", f"{edge}/api/track/lead", json=body, headers={**auth, "Idempotency-Key": "k-lead"}
            )
            assert status == 200, led
            item = {"type": "click", "ref": world.link["code"], "idempotency_key": f"b-{secrets.token_hex(4)}"}
            status, batched, _ = await call("POST", f"{edge}/v1/events/batch", json=[item], headers=auth)
            assert status == 200 and batched["results"][0]["ok"], batched
            fp = {"ref": world.link["code"], "visitor_id": f"v-{secrets.token_hex(4)}", "fingerprint": "fp-1"}
            status, _, _ = await call("POST", f"{edge}/v1/track/click", json=fp, headers=auth)
            assert status == 200

            async def order() -> bool:
                # the three writes themselves (two records, one fingerprint entry), not any
                # three commands: a rate limit's script is one, and MONITOR may lag the answers
                records = [c for c in seen if c.startswith("SET") and ":idk:" in c]
                return len(records) >= 2 and any(c.startswith("SET") and ":fp:" in c for c in seen)

            await wait_for(order, what="the three writes as Redis received them")
            watching.cancel()
    finally:
        await watcher.aclose()
        await runner.cleanup()
    answers, fpv = keys.answers(world.workspace_id), f"{keys.prefix}:fpv:{world.workspace_id}:"
    # as Redis ran them (a script's own commands show): each record's filing before the record
    records = [(i, c.split()[1].rpartition(":")[2]) for i, c in enumerate(seen) if c.startswith("SET") and ":idk:" in c]
    filings = [(i, c.split()[3]) for i, c in enumerate(seen) if c.startswith("ZADD") and c.split()[1] == answers]
    assert len(records) == len(filings) == 2, seen  # the lead's, the batch item's
    for at, digest in records:
        assert any(i < at and f":{digest}:" in member for i, member in filings), (digest, seen)
    sets = [i for i, c in enumerate(seen) if c.startswith("SET") and ":fp:" in c]
    remembered = [i for i, c in enumerate(seen) if c.startswith("SADD") and fpv in c]
    assert len(sets) == len(remembered) == 1 and remembered[0] < sets[0], seen


async def _keyed_sale(edge: str, world: World, redis: Any, keys: Keys) -> tuple[str, str]:
    """A keyed sale stored by the edge: its customer, and its key's record. No row keeps a
    sale's key: the sweep knows its record by its filing alone."""
    external = f"cust-{secrets.token_hex(4)}"
    body = {"customer_id": external, "amount": 4900, "currency": "usd"}
    headers = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": f"k-{secrets.token_hex(4)}"}
    status, sold, _ = await call("POST", f"{edge}/v1/track/conversion", json=body, headers=headers)
    assert status == 200, sold
    return external, await _record(redis, keys, world, external)


@pytest.mark.parametrize("days", [120, -120], ids=["ahead", "behind"])
async def test_a_filing_made_on_a_clock_that_is_off_prunes_no_other_and_is_not_pruned(
    days: int, edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """Seed 284678018: an edge started with its clock 120 days ahead (unmeasured: Redis and
    Postgres away) filed its keyed events by their times, and pruned what lay a window
    before them: every filing of the present, so two keyed sales erased later kept their
    customer in their answers. An edge behind saw its own filings pruned by the next
    filing of the present. A filing is pruned by Redis's clock now, a window after Redis
    filed it: between two sales of the present, what such an edge files (its event minted
    on its clock) leaves both reachable, and stays itself."""
    first = await _keyed_sale(edge, world, redis, keys)
    off = uuid7(int(time.time() * 1000) + days * 86_400_000)
    window_ms = settings.idempotency_window_s * 1000
    (filing,) = erasure_index.answer_commands(keys, world.workspace_id, (0, off, "ab" * 16, True), window_ms)
    await redis.execute_command(*filing)
    second = await _keyed_sale(edge, world, redis, keys)
    await drain()
    filed = {
        p[0]
        for m in await redis.zrange(keys.answers(world.workspace_id), 0, -1)
        if (p := erasure_index.parse_answer(m))
    }
    assert off.hex in filed, filed
    for external, _ in (first, second):
        await _erase(edge, pg, redis, keys, world, external)

    swept = await erasure.sweep(pg, redis, keys, None)
    assert swept.answers_rewritten == 2, swept
    for external, record in (first, second):
        raw = await redis.get(record)
        assert raw is not None and external.encode() not in raw, raw


async def test_a_record_an_earlier_edge_filed_in_its_index_is_reached(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """An edge of the release before filed its records in ``Keys.answers_before`` (pruned by
    its events' times); within a window of the upgrade a keyed sale's record is known by
    that filing alone, and the sweep reads it there too."""
    external, record = await _keyed_sale(edge, world, redis, keys)
    await drain()
    index, before = keys.answers(world.workspace_id), keys.answers_before(world.workspace_id)
    [(member, ms)] = await redis.zrange(index, 0, -1, withscores=True)
    assert await redis.delete(index, keys.answers_filed(world.workspace_id)) == 2
    await redis.zadd(before, {member: ms})  # where, and as, the earlier edge filed it
    await _erase(edge, pg, redis, keys, world, external)

    swept = await erasure.sweep(pg, redis, keys, None)
    assert swept.answers_rewritten == 1, swept
    raw = await redis.get(record)
    assert raw is not None and external.encode() not in raw, raw
