"""Workspaces on several Postgres primaries (docs/shards.md): the directory and a second
shard, each a database of its own; real `refstream` processes place workspaces, the edge
authenticates, resolves and appends, and the worker stores each event on its workspace's
shard, once, with counters equal to their rows on each."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis

from ingest.contract import clicks, erasure
from ingest.contract.connections import create_pg_pool
from ingest.contract.events import Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.ledger import placement
from ingest.manage import suppressions
from ingest.privacy.suppressed import Suppressed
from workers.consumer.pipeline import Pipeline
from workers.consumer.store import BatchResult
from workers.consumer.waiting import Rooms
from workers.group.errors import BatchOutage

from ._procs import Procs, env_for, run_command
from ._world import call
from .conftest import wait_for
from .test_e2e import TRACKED, fire

PASSWORD = "s3cret-Sh4rd/pw"  # trust auth ignores it; it must still never be stored in clear


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_dsn_keeps_its_password_apart_and_gets_it_back() -> None:
    dsn = "postgresql://ops%40acme:p%40ss%3Aw0rd@db-b.internal:6432/refstream?sslmode=require"
    public, password = placement.split_password(dsn)
    assert password == "p@ss:w0rd" and "w0rd" not in public
    assert public == "postgresql://ops%40acme@db-b.internal:6432/refstream?sslmode=require"
    assert placement.split_password(placement.with_password(public, password)) == (public, password)
    assert placement.split_password("postgresql://db-b/refstream") == ("postgresql://db-b/refstream", None)
    for bad in ("default", "B", "1b", "", "b" * 41, "b c"):
        with pytest.raises(placement.ShardError):
            placement.check_name(bad)
    with pytest.raises(placement.ShardError):
        placement.split_password("mysql://db-b/refstream")


async def test_each_workspace_is_stored_on_its_own_shard(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: Any
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        assert (await procs.cli("migrate"))["shards"] == ["default"]
        added = await procs.cli("shards", "add", "b", placement.with_password(shard_url, PASSWORD))
        assert added["shard"] == "b" and PASSWORD not in added["dsn"]
        listed = await procs.cli("shards", "list")
        assert [(r["name"], r["workspaces"]) for r in listed] == [("default", 0), ("b", 0)]
        assert PASSWORD not in str(listed)

        a = await procs.cli("workspace", "create", "A", "--shard", "default")
        b = await procs.cli("workspace", "create", "B")  # the shard with the fewest workspaces
        assert (a["shard"], b["shard"]) == ("default", "b")
        env = env_for(s)
        bad = await run_command("workspace", "create", "C", "--shard", "nowhere", env=env)
        assert bad[0] == 1 and "no shard named 'nowhere'" in bad[2]
        alink = await procs.cli("link", "create", "--workspace", a["workspace_id"], "--code", "acode")
        await procs.cli("link", "create", "--workspace", b["workspace_id"], "--code", "bcode")
        # a code is unique across shards: neither workspace takes the other's
        for ws, code in ((b, "acode"), (a, "bcode")):
            refused = await run_command("link", "create", "--workspace", ws["workspace_id"], "--code", code, env=env)
            assert refused[0] == 1 and "exists already" in refused[2], refused

        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="100000")
        procs.start("work")
        # the management API writes on the key's shard
        h = auth(b["api_key"])
        status, program, _ = await call("POST", f"{edge}/v1/programs", headers=h, json={"name": "Spring"})
        assert status == 201, program
        status, affiliate, _ = await call(
            "POST", f"{edge}/v1/affiliates", headers=h, json={"program_id": program["id"], "external_id": "jane"}
        )
        assert status == 201, affiliate
        status, link, _ = await call(
            "POST", f"{edge}/v1/links", headers=h, json={"affiliate_id": affiliate["id"], "url": "https://b.test/"}
        )
        assert status == 201, link
        # more links at once than the edge's pool holds connections, on the directory's own
        # shard: each claims its code on a connection of its own, none waits on another
        many = await asyncio.gather(
            *(
                call(
                    "POST",
                    f"{edge}/v1/links",
                    headers=auth(a["api_key"]),
                    json={"affiliate_id": alink["affiliate_id"], "url": "https://a.test/"},
                )
                for _ in range(8)
            )
        )
        assert [st for st, _, _ in many] == [201] * 8, many

        replies = await fire(edge, ["acode"] * 30 + ["bcode"] * 20 + [link["code"]] * 10)
        assert all(r == (200, TRACKED) for r in replies), replies[:3]
        status, click, _ = await call(
            "POST", f"{edge}/api/v1/track/click", json={"affiliate_url": f"https://b.test/?aff={link['code']}"}
        )
        assert status == 200, click
        await procs.cli("work", "--drain")
        # the click's cache entry gone: the lead finds it in shard b's Postgres
        await redis.delete(keys.click(click["click_id"]))
        lead = {"clickId": click["click_id"], "eventName": "Sign Up", "customerExternalId": "cust_b"}
        status, out, _ = await call("POST", f"{edge}/api/track/lead", json=lead, headers=h)
        assert status == 200, out
        await procs.cli("work", "--drain")

        for stream in keys.streams:
            (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            assert group["pending"] == 0
        directory = await asyncpg.connect(directory_url)
        shard = await asyncpg.connect(shard_url)
        try:
            assert await _counts(directory) == {("A", 1): 30}
            assert await _counts(shard) == {("B", 1): 31, ("B", 2): 1}
            for conn in (directory, shard):  # counters equal their rows, on each shard
                assert await conn.fetch(_COUNTERS_OFF) == []
            assert await shard.fetchval("SELECT status FROM customers WHERE external_id = 'cust_b'") == 2
            # the directory keeps the map, the codes and the shard's DSN, no password
            held = await directory.fetchrow("SELECT dsn, password_sealed FROM shards WHERE name = 'b'")
            assert PASSWORD not in held["dsn"] and PASSWORD.encode() not in bytes(held["password_sealed"])
            placed = await directory.fetch("SELECT workspace_id::text AS ws, shard FROM workspace_shards")
            assert {(r["ws"], r["shard"]) for r in placed} == {(a["workspace_id"], "default"), (b["workspace_id"], "b")}
            assert await directory.fetchval("SELECT count(*) FROM link_codes") == 3 + 8
        finally:
            await directory.close()
            await shard.close()

        shown = await procs.cli("link", "show", "bcode")  # found on its shard
        assert shown["clicks"] == 20
        status, read, _ = await call("GET", f"{edge}/v1/links/{link['id']}", headers=h)
        assert status == 200 and (read["clicks"], read["leads"]) == (11, 1)
        assert (await procs.cli("migrate"))["shards"] == ["default", "b"]
    finally:
        procs.stop_all()


_COUNTERS_OFF = """
SELECT l.code FROM links l
WHERE l.clicks <> (SELECT count(*) FROM events e WHERE e.link_id = l.id AND e.type = 1)
   OR l.leads <> (SELECT count(*) FROM events e WHERE e.link_id = l.id AND e.type = 2)
"""


async def _counts(conn: asyncpg.Connection) -> dict[tuple[str, int], int]:
    rows = await conn.fetch(
        "SELECT w.name, e.type, count(*) AS n FROM events e JOIN workspaces w ON w.id = e.workspace_id"
        " GROUP BY w.name, e.type"
    )
    return {(r["name"], r["type"]): r["n"] for r in rows}


async def _setup(
    procs: Procs, shard_url: str, *, name: str = "Moving", shard: str = "default", code: str = "mcode"
) -> dict[str, Any]:
    """The directory migrated, shard b added, and a workspace on ``shard`` with link ``code``."""
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    ws = await procs.cli("workspace", "create", name, "--shard", shard)
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
    return dict(ws)


async def test_a_workspace_moved_under_load_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: Any
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        ws = await _setup(procs, shard_url)
        edge = await procs.start_edge(REFSTREAM_CLICK_RATE_LIMIT_PER_MIN="1000000")
        procs.start("work")
        procs.start("work")
        replies: list[tuple[int, object]] = []
        moving = asyncio.Event()

        async def load() -> None:  # clicks before, during and after the move
            while not moving.is_set():
                replies.extend(await fire(edge, ["mcode"] * 20, concurrency=4))
            for _ in range(5):
                replies.extend(await fire(edge, ["mcode"] * 20, concurrency=4))

        firing = asyncio.create_task(load())
        try:
            await wait_for(lambda: _stored(directory_url), what="clicks stored before the move")
            moved = await procs.cli("workspace", "move", ws["workspace_id"], "--to", "b", timeout=300)
        finally:
            moving.set()
            await firing
        assert moved["state"] == "switched" and (moved["from"], moved["to"]) == ("default", "b"), moved
        assert replies and all(r == (200, TRACKED) for r in replies), [r for r in replies if r != (200, TRACKED)][:3]
        await procs.cli("work", "--drain")
        for stream in keys.streams:
            (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            assert group["pending"] == 0
        shard = await asyncpg.connect(shard_url)
        try:  # every click answered 200 stored once, where the workspace is now
            assert await shard.fetchval("SELECT count(*) FROM events WHERE type = 1") == len(replies)
            assert await shard.fetchval("SELECT count(DISTINCT event_id) FROM events") == len(replies)
            assert await shard.fetchval("SELECT clicks FROM links WHERE code = 'mcode'") == len(replies)
            assert await shard.fetch(_COUNTERS_OFF) == []
        finally:
            await shard.close()
        assert (await procs.cli("link", "show", "mcode"))["clicks"] == len(replies)
        listed = {r["name"]: r["workspaces"] for r in await procs.cli("shards", "list")}
        assert listed == {"default": 0, "b": 1}

        # the old copy: frozen until dropped, then gone
        directory = await asyncpg.connect(directory_url)
        try:
            assert await directory.fetchval("SELECT moved_to FROM workspaces") == "b"
            dropped = await procs.cli("workspace", "move", ws["workspace_id"], "--drop-old")
            assert dropped["dropped_from"] == "default"
            assert await directory.fetchval("SELECT count(*) FROM workspaces") == 0
            assert await directory.fetchval("SELECT count(*) FROM events") == 0
            assert await directory.fetchval("SELECT shard FROM workspace_shards") == "b"
            # a drop that committed, but whose record did not (the directory went read-only
            # between them): run again, it finds the old copy gone and records the drop
            await directory.execute("UPDATE workspace_moves SET state = 'switched'")
            again = await procs.cli("workspace", "move", ws["workspace_id"], "--drop-old")
            assert (again["dropped_from"], again["deleted"]) == ("default", {}), again
            assert await directory.fetchval("SELECT state FROM workspace_moves") == "dropped"
        finally:
            await directory.close()
        # and a move back is a move like any other
        back = await procs.cli("workspace", "move", ws["workspace_id"], "--to", "default", timeout=300)
        assert back["state"] == "switched"
        assert (await procs.cli("link", "show", "mcode"))["clicks"] == len(replies)
    finally:
        procs.stop_all()


async def _stored(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM events") >= 40)
    finally:
        await conn.close()


async def test_each_shards_do_not_track_list_is_read_from_that_shard(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    a = (await procs.cli("workspace", "create", "A", "--shard", "default"))["workspace_id"]
    b = (await procs.cli("workspace", "create", "B", "--shard", "b"))["workspace_id"]
    erasure.forget_salt()  # the salt the shards share, not the suite's database's
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    place = placement.Placement.over(s, directory)
    try:
        for url, ws, visitor in ((directory_url, a, "v-a"), (shard_url, b, "v-b")):
            conn = await asyncpg.connect(url)
            try:
                await suppressions.add(conn, ws, "visitor", visitor, by="test")
            finally:
                await conn.close()
        listed = Suppressed()
        await listed._read_shards(place)  # what the edge's loop does every period

        def names(ws: str, visitor: str) -> bool:
            return listed.names(Envelope(EventType.CLICK, "biore", {"visitor_id": visitor}, workspace_id=ws))

        assert names(a, "v-a") and names(b, "v-b")  # each shard's list, read from it
        assert not names(a, "v-b") and not names(b, "v-a")  # and each workspace's its own
    finally:
        await place.close()
        await directory.close()
        erasure.forget_salt()


async def test_each_shards_do_not_track_list_is_read_while_another_shard_is_down(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """The edge reads every shard's do-not-track list in turn; a shard it could not reach
    ended the read there, and the shards after it kept their lists as last read: a visitor
    added to one of theirs went on being tracked for as long as the other was down. Every
    shard's list is read now, and the failure said once all have been."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    b = (await procs.cli("workspace", "create", "B", "--shard", "b"))["workspace_id"]
    erasure.forget_salt()  # the salt the shards share, not the suite's database's
    on_b = await create_pg_pool(s.model_copy(update={"database_url": shard_url}), min_size=1, max_size=2)
    down = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/gone", min_size=0)  # nothing listens

    class Shards:
        async def pools(self) -> dict[str, asyncpg.Pool]:
            return {"default": down, "b": on_b}

    try:
        async with on_b.acquire() as conn:
            await suppressions.add(conn, b, "visitor", "v-b", by="test")
        listed = Suppressed()
        with pytest.raises(OSError):
            await listed._read_shards(Shards())
        assert listed.names(Envelope(EventType.CLICK, "biore", {"visitor_id": "v-b"}, workspace_id=b))
    finally:
        await down.close()
        await on_b.close()
        erasure.forget_salt()


async def test_a_lookup_across_the_shards_finds_what_is_on_one_while_another_is_down(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], scratch_url: str
) -> None:
    """A key's digest and a click's id are looked up shard by shard. A shard that could not
    be reached failed the lookup there: the keys and clicks of every shard after it were
    refused (503) for as long as it was down. The shard down is passed over now; what is
    on another is found, and what is found nowhere raises the failure, never "not found"."""
    from ingest.edge import auth
    from ingest.edge.resolve import _click_anywhere

    directory_url, b_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", b_url)
    await procs.cli("shards", "add", "c", scratch_url)
    c = await procs.cli("workspace", "create", "C", "--shard", "c")
    await procs.cli("link", "create", "--workspace", c["workspace_id"], "--code", "ccode")
    digest = hashlib.sha256(c["api_key"].encode()).digest()
    click = uuid7()
    on_c = await asyncpg.connect(scratch_url)
    try:  # a click stored on c
        link = await on_c.fetchval("SELECT id FROM links WHERE code = 'ccode'")
        await on_c.execute(
            "INSERT INTO events (event_id, workspace_id, link_id, type, dialect, received_at)"
            " VALUES ($1, $2, $3, 1, 'biore', now())",
            click,
            uuid.UUID(c["workspace_id"]),
            link,
        )
    finally:
        await on_c.close()
    b_name = b_url.rsplit("/", 1)[1].split("?")[0]
    server = await asyncpg.connect(directory_url)
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    place = placement.Placement.over(s, directory)
    try:
        await server.execute(f'ALTER DATABASE "{b_name}" ALLOW_CONNECTIONS false')  # b, before c, down
        await server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", b_name)
        found = await place.find(lambda pool: pool.fetchrow(auth._SELECT_KEY, digest), lambda r: r["workspace_id"])
        assert found is not None and found[0] == "c", found
        with pytest.raises(asyncpg.PostgresError):  # found nowhere: it may be on b
            await place.find(lambda pool: pool.fetchrow(auth._SELECT_KEY, b"\x00" * 32))
        ref, _ = await _click_anywhere(cast(Any, SimpleNamespace(shards=place)), clicks.mint(click))
        assert isinstance(ref, clicks.ClickRef) and ref.workspace_id == c["workspace_id"], ref
        with pytest.raises(asyncpg.PostgresError):
            await _click_anywhere(cast(Any, SimpleNamespace(shards=place)), clicks.mint(uuid7()))
    finally:
        await server.execute(f'ALTER DATABASE "{b_name}" ALLOW_CONNECTIONS true')
        await server.close()
        await place.close()
        await directory.close()


async def test_a_redis_outage_holds_a_sharded_batch_and_letters_nothing(keys: Keys) -> None:
    """The waiting rooms' Redis step of a batch's write fails as Redis, never as the batch:
    the pipeline holds the batch (``BatchOutage``) rather than setting its events aside."""
    down = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    place = placement.Placement(cast(asyncpg.Pool, None), _no_pool, None)
    rooms = Rooms(down, keys, place)
    written: list[str] = []

    async def write_part(shard: str, events: list[Envelope]) -> BatchResult:
        written.append(shard)
        return BatchResult(inserted=len(events))

    event = Envelope(EventType.CLICK, "biore", {"code": "x"}, workspace_id=str(uuid.uuid4()))
    try:
        with pytest.raises(BatchOutage) as held:
            await rooms.write([event], write_part)
        assert held.value.reason and written == []
    finally:
        await down.aclose()


async def _no_pool(url: str) -> asyncpg.Pool:
    raise AssertionError("no shard is opened here")


async def test_a_click_taken_without_its_link_is_stored_on_the_links_shard(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: Any
) -> None:
    """The edge takes a click whose link it could not resolve (Postgres down, the link cache
    cold) with its code alone: the workers find the code's workspace in the directory and
    store the click on that workspace's shard, not drop it as unknown on the first."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await _setup(procs, shard_url, name="B", shard="b", code="bcode")
    pool = await create_pg_pool(s, min_size=1, max_size=4)
    pipeline = Pipeline(s, redis, pool)
    try:
        unresolved = Envelope(EventType.CLICK, "biore", {"code": "bcode"}, ip="198.51.100.7")
        result = await pipeline._write([unresolved])
        assert result.inserted == 1 and not result.unknown_codes, result
        shard = await asyncpg.connect(shard_url)
        try:
            assert await shard.fetchval("SELECT count(*) FROM events") == 1
            assert await shard.fetchval("SELECT clicks FROM links WHERE code = 'bcode'") == 1
        finally:
            await shard.close()
        assert await pool.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await pipeline.placement.close()
        await pool.close()


EMAIL_FAR = "far.customer@example.com"
IP_FAR = "203.0.113.71"


async def _erased_on_b(procs: Procs, s: Settings, shard_url: str, code: str) -> Envelope:
    """A workspace on shard b with a link, and a lead of its customer ``cust-far-1``, who is
    then erased (the erasure in shard b's ledger): the lead, made before the erasure."""
    from ingest.contract.events import Dialect
    from ingest.privacy import erasure as pg_erasure

    ws = await _setup(procs, shard_url, name="Far", shard="b", code=code)
    lead = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {"code": code, "external_id": "cust-far-1", "email": EMAIL_FAR},
        ws["workspace_id"],
        IP_FAR,
        "Mozilla/5.0",
    )
    shard = await create_pg_pool(s.model_copy(update={"database_url": shard_url}), min_size=1, max_size=2)
    try:
        await pg_erasure.erase(shard, ws["workspace_id"], "cust-far-1", by="test", archive_days=30)
    finally:
        await shard.close()
    return lead


def _kept_far(held: bytes) -> list[bytes]:
    return [v for v in (b"cust-far-1", EMAIL_FAR.encode(), IP_FAR.encode()) if v in held]


@pytest.mark.parametrize("placed", [True, False], ids=["its workspace", "its code alone"])
async def test_a_spool_drains_an_erased_customers_event_scrubbed_by_their_shards_ledger(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: aioredis.Redis, placed: bool
) -> None:
    """An event an edge spooled drains after its customer's erasure: scrubbed by the ledger
    of the shard their workspace is on (the erasure is in that shard's ledger alone), not
    by the directory's. The edge drains, at its start, what the spool holds. An event the
    edge took while it could not resolve its link (Redis away: a redirect's click, say)
    carries its code alone, and is checked on the shard of its code's owner, as the workers
    place it: the old drain asked the directory's shard, which knew neither the link nor the
    erasure, and appended it raw (generative seed 774914465: an erased lead's click kept its
    referrer in the stream)."""
    from ingest.contract import wire
    from ingest.spool.spool import Spool

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    try:
        code = "farcode1"
        spool_dir = tmp_path / "edge-spool"
        spool = Spool(spool_dir, max_bytes=10_000_000)
        lead = await _erased_on_b(procs, s, shard_url, code)
        if not placed:
            lead = Envelope(lead.type, lead.dialect, lead.payload, None, lead.ip, lead.user_agent)
        await spool.append(keys.stream_for(code), wire.to_blob(lead))
        await spool.close()
        await procs.start_edge(REFSTREAM_SPOOL_DIR=str(spool_dir))

        async def drained() -> dict[bytes, bytes] | None:
            entries = await redis.xrange(keys.stream_for(code))
            return next((f for _, f in entries if wire.from_entry(f).event_id == lead.event_id), None)

        fields = await wait_for(drained, timeout=30, what="the spooled lead drained")
        assert _kept_far(b"\x00".join(v for kv in fields.items() for v in kv)) == [], fields
        assert erasure.is_pseudonym(wire.from_entry(fields).payload["external_id"])
    finally:
        procs.stop_all()


async def test_an_archiver_scrubs_an_erased_customers_entry_by_their_shards_ledger(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: aioredis.Redis
) -> None:
    """An entry of a customer erased on shard b, archived: the segment holds it scrubbed
    (the archiver checks each entry against its workspace's shard's ledger)."""
    from workers.archive import erased
    from workers.archive import segment as seg
    from workers.archive.archiver import Archiver
    from workers.archive.store import LocalStore

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url, "archive_url": f"file://{tmp_path / 'archive'}"})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    store = LocalStore(str(tmp_path / "archive"))
    try:
        code = "farcode2"
        lead = await _erased_on_b(procs, s, shard_url, code)
        archiver = Archiver(s, redis, store, name="a1")
        await archiver.ensure_groups()
        await redis.xadd(keys.stream_for(code), erased.fields_of(lead))  # type: ignore[arg-type]
        await asyncio.wait_for(archiver.run(drain=True), 60)
        await archiver.close()
        lines = [line for key in await store.list(s.stream_prefix + "/") for line in seg.read(await store.get(key))[1]]
        assert len(lines) == 1, lines
        held = (lines[0].envelope or b"") + b"\x00".join((lines[0].fields or {}).values())
        assert _kept_far(held) == [], held
    finally:
        procs.stop_all()


async def test_a_workers_partitions_restoring_the_erasure_ledger_at_once_never_wait_on_each_other(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: aioredis.Redis, monkeypatch: Any
) -> None:
    """A worker restores the erasure ledger's copy (``ingest.privacy.erasure_copy``) before its
    first batch, and with several shards asks the directory where each erasure's workspace is.
    A worker whose first batches met an outage restores on every partition at once. Each held
    a connection of the directory's pool while it asked, and the map's read took another of
    the same pool: as many restores as connections, and none ever moved again (generative seed
    1789722521: a worker held its entries until the run gave up). The map here is always
    stale (``REFRESH_S`` 0), so every question reads it."""
    from ingest.privacy import erasure_copy

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url, "pg_pool_size": 2})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    await _erased_on_b(procs, s, shard_url, "restorecode")
    shard = await create_pg_pool(s.model_copy(update={"database_url": shard_url}), min_size=1, max_size=2)
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    pipeline = Pipeline(s, redis, directory)
    try:
        ids = [r["id"] for r in await shard.fetch("SELECT id FROM erasures")]
        assert await erasure_copy.keep(shard, redis, keys, ids) == len(ids) == 1
        await shard.execute("DELETE FROM erased_ids; DELETE FROM erasures")  # a restore lost them
        monkeypatch.setattr(placement, "REFRESH_S", 0.0)
        async with asyncio.timeout(30):  # the old code waited for ever
            await asyncio.gather(*(pipeline.ledger.all() for _ in range(4)))
        assert pipeline.ledger.done
        assert await shard.fetchval("SELECT count(*) FROM erasures") == 1  # back where its workspace is
        assert await directory.fetchval("SELECT count(*) FROM erasures") == 0
    finally:
        await redis.delete(erasure_copy.key(keys))
        await pipeline.placement.close()
        await shard.close()
        await directory.close()
        erasure.forget_salt()


async def test_a_fresh_workers_first_batch_parked_in_a_room_still_files_its_late_entries(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], redis: Any
) -> None:
    """A worker files an entry appended long after its event (a spool drained late) for the
    erasure sweep, under the ledger's salt, in the ack's round trip (``erased.filed``). A
    worker started during a move parked its first batches in the workspace's waiting room and
    wrote no row: it had never read the salt, filed nothing, and the sweep of a later erasure
    never found the entry, which kept the click's referrer (generative seed 1789722521)."""
    from ingest.contract import clicks, clock, erasure_index, wire
    from ingest.contract.events import Dialect, uuid7
    from workers.consumer.pipeline import Batch

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    keys = Keys(s.stream_prefix, s.partitions)
    procs = Procs(s, tmp_path)
    ws = (await _setup(procs, shard_url, shard="b", code="parkedcode"))["workspace_id"]
    old = uuid7(clock.now_ms() - 120_000)  # spooled two minutes ago
    cid = clicks.mint(old)
    payload = {"code": "parkedcode", "click_id": cid, "visitor_id": cid, "referrer": "https://ref.test/parked"}
    click = Envelope(EventType.CLICK, Dialect.AFFITOR, payload, ws, IP_FAR, "Mozilla/5.0", old)
    directory = await create_pg_pool(s, min_size=1, max_size=4)
    await directory.execute("UPDATE workspace_shards SET fenced = true WHERE workspace_id = $1", uuid.UUID(ws))
    stream = keys.stream(keys.partition_for("parkedcode"))
    erasure.forget_salt()  # a fresh process
    pipeline = Pipeline(s, redis, directory)
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await redis.xadd(stream, wire.to_entry_dict(click))
        read = await redis.xreadgroup(GROUP, "test", {stream: ">"})
        entries = [(sid, fields) for _, page in read for sid, fields in page]
        await pipeline.process(Batch(keys.partition_for("parkedcode"), stream, entries))
        assert await redis.xlen(keys.waiting_room(ws)) == 1  # parked, and acked
        async with directory.acquire() as conn:
            salt = await erasure.salt(conn)
        filed = [await redis.smembers(keys.entries_of(ws, d)) for d in erasure.digests_of(salt, click, ws)]
        sid = entries[0][0].decode()
        assert filed and all(f"{keys.partition_for('parkedcode')}:{sid}".encode() in m for m in filed), filed
        assert not erasure_index.near(click.event_id, sid)
    finally:
        await pipeline.placement.close()
        await directory.close()
        erasure.forget_salt()


async def test_a_link_is_found_by_a_map_read_before_its_workspace_moved_and_its_old_copy_dropped(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str], monkeypatch: Any
) -> None:
    """A process reads the map at most every ``REFRESH_S``. Within that, a move may switch
    and its old copy be dropped: by the map it read, the link's workspace is on the shard
    that has it no more, and the shard that has it holds a workspace the map places
    elsewhere. The old lookup passed over it and answered no link (a 400 "No referral link
    found" for a well-formed click: seed 562805026); the map is now read again first."""
    from ingest.contract import links

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    ws = (await _setup(procs, shard_url, shard="b", code="movingcode"))["workspace_id"]
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    place = placement.Placement.over(s, directory)
    try:
        assert await place.shard_of(ws) == "b"  # the map, read now
        refresh = placement.REFRESH_S  # every other process's (the commands')
        monkeypatch.setattr(placement, "REFRESH_S", 3600.0)  # and this one's not again unless asked
        await procs.cli("workspace", "move", ws, "--to", "default", timeout=300)
        dropped = await procs.cli("workspace", "move", ws, "--drop-old")
        assert dropped["after_switch_s"] >= 2 * refresh  # every process's map read since the switch
        found = await place.find(lambda pool: links.fetch(pool, "movingcode"), lambda link: link.workspace_id)
        assert found is not None and found[0] == "default", found
    finally:
        await place.close()
        await directory.close()


async def test_a_replayed_event_that_names_only_its_code_is_stored_on_its_workspaces_shard(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """An edge that could not resolve a link takes the click with its code alone (no
    workspace), and a replay of its stream range stores it. The workers find such an
    event's workspace by the directory's claim of its code (``Rooms.own``); the replay split
    its pages by the event's own workspace, None, so the click went to ``default``, unfenced:
    dropped there as an unknown code, or, while the workspace moved to ``default``, written
    into the move's arriving copy, where the last catch up kept the event (append only) and
    took away its visitor-day and its counts (the generative test's ``counters``, seeds
    1347019938 and 1972980936)."""
    from ingest.contract.events import Dialect
    from workers.ops import replay_shards

    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await _setup(procs, shard_url, shard="b", code="rcode")
    erasure.forget_salt()  # the salt the shards share, not the suite's database's
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    place = placement.Placement.over(s, directory)
    click = Envelope(EventType.CLICK, Dialect.AFFITOR, {"code": "rcode", "visitor_id": "v-replayed"}, None)
    try:
        await replay_shards.write(place, [click], None)
    finally:
        await place.close()
        await directory.close()
        erasure.forget_salt()
    for url, held in ((shard_url, (1, 1, 1)), (directory_url, (0, 0, 0))):
        conn = await asyncpg.connect(url)
        try:
            found = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM events WHERE event_id = $1) AS events,"
                " (SELECT coalesce(sum(clicks), 0) FROM links WHERE code = 'rcode') AS clicks,"
                " (SELECT count(*) FROM link_visitor_days) AS visitors",
                click.event_id,
            )
            assert tuple(found) == held, (url, dict(found))
        finally:
            await conn.close()


async def test_a_chore_on_every_shard_runs_past_a_shard_where_it_fails(
    settings: Settings, tmp_path: Any, two_shards: tuple[str, str]
) -> None:
    """The workers' crons (the erasure sweep, the commissions' approval, the link cache's
    refresh) run on each shard in turn. One shard's failure ended the pass there: the
    shards after it never had the chore while it lasted (a sweep failed every time on a
    shard whose copy of a workspace had moved away). Every shard runs now; the first
    failure is raised once all have run."""
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    directory = await create_pg_pool(s, min_size=1, max_size=2)
    place = placement.Placement.over(s, directory)
    ran: list[str] = []

    async def chore(pool: asyncpg.Pool) -> str:
        name: str = await pool.fetchval("SELECT current_database()")
        ran.append(name)
        if len(ran) == 1:
            raise RuntimeError("the first shard's chore failed")
        return name

    try:
        with pytest.raises(RuntimeError):
            await place.each(chore)  # a read of everything: stops at the failure
        assert len(ran) == 1
        ran.clear()
        with pytest.raises(RuntimeError, match="first shard"):
            await place.each(chore, every=True)
        assert sorted(ran) == sorted(url.rsplit("/", 1)[1] for url in two_shards)
        ran.clear()  # a chore that acts on the shards that passed before it raises (the burst pass's notices)
        done, failed = await place.settled(lambda _, pool: chore(pool))
        assert isinstance(failed, RuntimeError) and list(done.values()) == ran[1:], (done, ran)
    finally:
        await place.close()
        await directory.close()
