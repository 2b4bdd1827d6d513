"""The erasure's sweep costs what the erased people own, not what Redis holds (issue 64's
eighth finding; docs/privacy.md): with one erasure pending while the archiver lags (so every
sweep runs again), the Redis commands a sweep sends do not grow with everyone else's
fingerprint entries, idempotency answers and stream entries. Measured as the commands the
sweep's own client sends (every command redis-py packs), not as time."""

from __future__ import annotations

import collections
import hashlib
import secrets
import time
from typing import Any, ClassVar

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from ingest.contract import erasure as ledger
from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.privacy import erasure as pg_erasure
from workers.archive.archiver import GROUP as ARCHIVE
from workers.ops import erasure

from ._world import World, call
from .test_erasure import erase_key
from .test_sales import sale_body
from .test_seed_003_affixo import click
from .test_seed_004_refport import lead_body, new_click


class _Counting(Connection):
    """A connection that counts each command it packs (a pipeline's one by one)."""

    sent: ClassVar[collections.Counter[str]] = collections.Counter()

    def pack_command(self, *args: Any) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        _Counting.sent[name.split(" ")[0].upper()] += 1
        return super().pack_command(*args)


async def _counted(redis: Any, settings: Settings, pg: asyncpg.Pool, keys: Keys) -> tuple[int, dict[str, int]]:
    """One sweep through a client of its own; the commands it sent, by name."""
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, connection_class=_Counting)
    client = aioredis.Redis(connection_pool=pool)
    _Counting.sent.clear()
    try:
        swept = await erasure.sweep(pg, client, keys, None)
    finally:
        await client.aclose()
    assert swept.erasures == 1 and swept.entries_waiting, swept  # still pending: the archiver lags
    counted = dict(_Counting.sent)
    return sum(counted.values()), counted


async def _everyone_else(redis: Any, keys: Keys, world: World, n: int) -> None:
    """``n`` fingerprint entries, ``n`` idempotency answers and ``n`` stream entries of other
    people (of the same workspace: the sweep's own workspace is the one it must not scan)."""
    pipe = redis.pipeline(transaction=False)
    for _ in range(n):
        token = secrets.token_hex(16)
        pipe.set(keys.fingerprint(world.workspace_id, token), f"v_{token}", ex=3600)
        body = orjson.dumps({"ok": True, "visitor_id": f"v_{token}", "match_method": "cookie"})
        record = keys.idempotent(token, keys.partition_for(world.link["code"]), world.workspace_id)
        pipe.set(record, b"f" * 32 + b"200" + body, ex=3600)
        e = Envelope(EventType.CLICK, Dialect.AFFIXO, {"code": world.link["code"], "visitor_id": f"v_{token}"})
        e.workspace_id = world.workspace_id
        pipe.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(e))
    await pipe.execute()


async def test_a_pending_sweeps_redis_commands_do_not_grow_with_everyone_elses_keys(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """A person with three entries in Affixo's fingerprint cache (one a fingerprint matched,
    one met with their visitor id, one set by the batch route), a keyed Affixo click, a keyed lead and a keyed sale is
    erased while an archiver has read nothing: each sweep finds their entries waiting. With
    200 and then 5,000 of everyone else's fingerprint entries, answers and stream entries, a
    sweep sends the same commands; what is theirs is still reached (their fingerprint
    entries deleted, their answers rewritten)."""
    for p in range(keys.partitions):  # an archiver that lags: it has read nothing
        await redis.xgroup_create(keys.stream(p), ARCHIVE, id="0", mkstream=True)
    fp = f"fp-{secrets.token_hex(4)}"
    _, first, _ = await click(edge, world.api_key, {"ref": world.link["code"], "fingerprint": fp})
    visitor = first["visitor_id"]
    keyed = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "k-click"}
    body = {"ref": world.link["code"], "visitor_id": visitor, "url": "https://yoursite.com/"}
    status, answered, _ = await call("POST", f"{edge}/v1/track/click", json=body, headers=keyed)
    assert status == 200, answered
    external = f"cust-{secrets.token_hex(4)}"
    email = f"{external}@example.com"
    signed = lead_body(await new_click(edge), customerExternalId=external, customerEmail=email)
    keyed_lead = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "k-lead"}
    status, led, _ = await call("POST", f"{edge}/api/track/lead", json=signed, headers=keyed_lead)
    assert status == 200, led
    # a second browser of theirs, its fingerprint met with its visitor id (remembered for it),
    # and a sale under an Idempotency-Key (no row keeps a sale's key: only the index finds it)
    fp2, visitor2 = f"fp-{secrets.token_hex(4)}", f"v-{secrets.token_hex(4)}"
    status, _, _ = await click(
        edge, world.api_key, {"ref": world.link["code"], "visitor_id": visitor2, "fingerprint": fp2}
    )
    assert status == 200
    _, matched, _ = await click(edge, world.api_key, {"ref": world.link["code"], "fingerprint": fp})
    assert (matched["visitor_id"], matched["match_method"]) == (visitor, "fingerprint"), matched
    # a third browser of theirs through the batch route: its lookup set the entry, filed with the append
    fp3 = f"fp-{secrets.token_hex(4)}"
    status, batched, _ = await call(
        "POST",
        f"{edge}/v1/events/batch",
        json=[{"type": "click", "ref": world.link["code"], "fingerprint": fp3}],
        headers={"Authorization": f"Bearer {world.api_key}"},
    )
    assert status == 200 and batched["results"][0]["match_method"] == "new", batched
    visitor3 = batched["results"][0]["visitor_id"]
    sold = sale_body(customerExternalId=external, invoiceId=f"in-{secrets.token_hex(3)}")
    keyed_sale = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "k-sale"}
    status, paid, _ = await call("POST", f"{edge}/api/track/sale", json=sold, headers=keyed_sale)
    assert status == 200 and paid["customer"]["externalId"] == external, paid
    await drain()
    # one index of the fingerprint cache per visitor it names: a fingerprint matched (whose
    # visitor the edge minted in vain) files nothing
    indexes = [k async for k in redis.scan_iter(match=f"{keys.prefix}:fpv:{world.workspace_id}:*")]
    assert len(indexes) == 3, indexes
    await pg.execute(  # each browser's visitor signed up too (their customers rows, as a lead makes them)
        "UPDATE customers SET external_id = $2, email = $3 WHERE visitor_id = ANY($1::text[])",
        [visitor, visitor2, visitor3],
        external,
        email,
    )
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{external}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out
    await _everyone_else(redis, keys, world, 200)
    swept = await erasure.sweep(pg, redis, keys, None)
    assert swept.fingerprints_deleted == 3 and swept.answers_rewritten == 3 and swept.entries_waiting, swept
    for f in (fp, fp2, fp3):
        assert (
            await redis.get(keys.fingerprint(world.workspace_id, hashlib.sha256(f.encode()).hexdigest()[:32])) is None
        )

    few, by_name = await _counted(redis, settings, pg, keys)
    await _everyone_else(redis, keys, world, 4_800)
    many, by_name_many = await _counted(redis, settings, pg, keys)
    print(f"sweep commands: {few} with 200 of everyone else's keys, {many} with 5,000: {by_name_many}")
    assert many <= few + 2, (few, by_name, many, by_name_many)
    status, again, headers = await call("POST", f"{edge}/v1/track/click", json=body, headers=keyed)
    assert status == 200 and headers.get("Idempotent-Replayed") == "true", again
    assert ledger.is_pseudonym(again["visitor_id"]), again
    status, again, _ = await call("POST", f"{edge}/api/track/lead", json=signed, headers=keyed_lead)
    assert status == 200 and ledger.is_pseudonym(again["customer"]["externalId"]), again
    status, again, _ = await call("POST", f"{edge}/api/track/sale", json=sold, headers=keyed_sale)
    assert status == 200 and ledger.is_pseudonym(again["customer"]["externalId"]), again
    # the sale as it was answered, but its customer and its metadata (theirs: docs/privacy.md)
    assert again["sale"] == {**paid["sale"], "metadata": None} and again["eventName"] == paid["eventName"], again


async def test_the_sweep_finds_their_entries_appended_late_or_stored_as_no_row(
    world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """An entry no row and no time leads to: a copy of the person's lead appended an hour
    after its event (a spool drained late), and a click of theirs on a link gone before it
    was stored. The workers file both under the person's digests as they read them; the
    sweep reads those and deletes the entries, and nothing of them is left in a stream."""
    from ingest.contract.events import uuid7
    from ingest.privacy import erasure as pg_erasure

    from .test_erasure import Person, customer

    p, visitor = Person(), f"v-late-{secrets.token_hex(4)}"
    await customer(pg, world, visitor, p)
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    hour_ago = uuid7(int(time.time() * 1000) - 3_600_000)
    lead = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {"code": world.link["code"], "external_id": p.external_id, "email": p.email, "visitor_id": visitor},
        world.workspace_id,
        "127.0.0.66",
        "Mozilla/5.0",
        hour_ago,
        int(time.time() * 1000) - 3_600_000,
    )
    gone = Envelope(
        EventType.CLICK,
        Dialect.AFFIXO,
        {"code": f"GONE{secrets.token_hex(3).upper()}", "visitor_id": visitor, "referrer": "https://ref.test/gone"},
        world.workspace_id,
        "127.0.0.66",
        "Mozilla/5.0",
    )
    for e in (lead, gone):
        await redis.xadd(keys.stream_for(str(e.payload["code"])), wire.to_entry_dict(e))
    await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", gone.event_id) == 0  # no row
    swept = await erasure.sweep(pg, redis, keys, None)
    assert swept.entries_deleted == 2 and not swept.entries_waiting, swept
    held = [f for s in keys.streams for _, f in await redis.xrange(s) if visitor.encode() in b"".join(f.values())]
    assert held == []


class _Ranges(Connection):
    """A connection that notes each XRANGE it packs: its stream and where it starts."""

    sent: ClassVar[list[tuple[str, str]]] = []

    def pack_command(self, *args: Any) -> Any:
        if str(args[0]).upper() == "XRANGE":
            text = [a.decode() if isinstance(a, bytes) else str(a) for a in args[1:3]]
            _Ranges.sent.append((text[0], text[1]))
        return super().pack_command(*args)


async def test_each_shards_sweep_reads_only_the_dead_letters_written_since_its_last(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """Between the sweeps of one set of pending erasures, a sweep reads only the dead letters
    written since its last. With two shards, each with an erasure of its own, the shards'
    sweeps shared that place in the letters: each found it set by the other's, for other
    erasures, and read every letter again, every sweep on every shard. Each shard's sweeps
    now keep their own."""
    from ingest.contract.connections import create_pg_pool

    from ._procs import Procs

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    pools = {}
    ledger.forget_salt()  # the salt the shards share, not the suite's database's
    client = aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(s.redis_url, connection_class=_Ranges))
    try:
        for shard, url in (("default", directory_url), ("b", shard_url)):
            ws = await procs.cli("workspace", "create", f"On {shard}", "--shard", shard)
            pools[shard] = pool = await create_pg_pool(s.model_copy(update={"database_url": url}), min_size=1)
            await pg_erasure.erase(pool, ws["workspace_id"], f"cust-{shard}", by="test", archive_days=30)
        pipe = client.pipeline(transaction=False)
        for n in range(50):  # everyone else's letters
            e = Envelope(EventType.CLICK, Dialect.AFFIXO, {"code": "nobody", "visitor_id": f"v_{n}"})
            letter: dict[Any, Any] = {"stream": keys.stream(0), "id": "1-0", "error": "a test's"}
            pipe.xadd(keys.dead, letter | wire.to_entry_dict(e))
        await pipe.execute()

        async def swept(shard: str) -> list[str]:
            _Ranges.sent.clear()
            await erasure.sweep(pools[shard], client, keys, None, shard=shard)
            # pending still, as while an archiver lags (the erasures unchanged: one state)
            await pools[shard].execute("UPDATE erasures SET redis_at = NULL, archive_at = NULL")
            return [start for stream, start in _Ranges.sent if stream == keys.dead]

        assert (await swept("default"))[0] == "-"  # its erasures' first sweep: every letter
        assert (await swept("b"))[0] == "-"
        again = await swept("default")
        assert again and all(start.startswith("(") for start in again), again  # those since its last
    finally:
        await client.aclose()
        for pool in pools.values():
            await pool.close()
        ledger.forget_salt()
