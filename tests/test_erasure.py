"""Erasure (docs/privacy.md): a customer with a click, a lead (under an Idempotency-Key)
and a sale, stored in Postgres, in the archive, and with a copy still unread in a stream,
is erased through ``DELETE /v1/customers/{external_id}``. After the workers' sweep and a
full replay from the archive, a search of a ``pg_dump``, of every Redis key of the test and
of every archive segment (a directory, and an S3-compatible store) finds none of their
email, name, external id or IP; every counter is as it was, and reconcile finds no drift.
A spool drained after the erasure appends the person's event scrubbed; the ledger holds no
personal data; ``erase`` needs its own scope; the CLI erases and reports what is pending."""

from __future__ import annotations

import os
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import clicks, wire
from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.edge.idempotency import REPLAYED
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure
from ingest.spool.spool import Spool
from ingest.spool.store import Once
from workers.archive import segment as seg
from workers.archive.store import Store, open_store
from workers.consumer import trim
from workers.ops import erasure
from workers.ops.reconcile import reconcile
from workers.ops.replay import Range, Source, replay

from ._procs import Procs, env_for, run_command
from ._world import World, call
from .test_archive import archived, run_archiver, s3  # noqa: F401 (s3: the fixture)
from .test_replay import snapshot
from .test_sales import sale_body
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead_body

DEBIAN_PG = Path("/usr/lib/postgresql/15/bin")
IP = "127.0.0.66"  # the person's address: the edge sees the socket's peer


class Person:
    def __init__(self) -> None:
        token = secrets.token_hex(4)
        self.external_id = f"cust-{token}"
        self.email = f"alice.{token}@example.com"
        self.name = f"Alice Erasable {token}"

    @property
    def needles(self) -> dict[str, bytes]:
        return {
            "email": self.email.encode(),
            "name": self.name.encode(),
            "external id": self.external_id.encode(),
            "IP": IP.encode(),
        }


async def erase_key(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, scopes: list[str]) -> str:
    async with pg.acquire() as conn:
        made = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=scopes)
    api_key: str = made["api_key"]
    return api_key


async def customer(pg: asyncpg.Pool, world: World, visitor: str, p: Person) -> None:
    """A customers row of ``p`` (as the workers would have made it from a lead)."""
    await pg.execute(
        "INSERT INTO customers (workspace_id, visitor_id, external_id, email, name, first_seen_at, last_seen_at)"
        " VALUES ($1, $2, $3, $4, $5, now(), now())",
        world.workspace_id,
        visitor,
        p.external_id,
        p.email,
        p.name,
    )


async def counters(pg: asyncpg.Pool) -> dict[str, Any]:
    out = await snapshot(pg)
    out.pop("visitors")  # its keys are renamed (pseudonyms); their number is in unique_clicks
    out["sales"] = [
        tuple(r)
        for r in await pg.fetch("SELECT link_id, day, currency, sales, amount FROM sale_stats ORDER BY 1, 2, 3")
    ]
    out["visitor_days"] = await pg.fetchval("SELECT count(*) FROM link_visitor_days")
    out["customers"] = await pg.fetchval("SELECT count(*) FROM customers")
    return out


def pg_dump_text(url: str) -> bytes:
    binary = DEBIAN_PG / "pg_dump" if (DEBIAN_PG / "pg_dump").exists() else None
    if binary is None:
        from refstream.embedded import pg_install

        binary = pg_install(os.geteuid() == 0) / "bin" / "pg_dump"
    done = subprocess.run([str(binary), "--data-only", "--no-owner", url], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


async def redis_bytes(redis: Any, keys: Keys) -> list[tuple[str, bytes]]:
    """Every key of this test's prefix, and every byte it holds."""
    out = []
    async for name in redis.scan_iter(match=f"{keys.prefix}*", count=500):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            held = [await redis.get(name)]
        elif kind == "stream":
            held = [v for _, fields in await redis.xrange(name) for kv in fields.items() for v in kv]
        elif kind == "hash":
            held = [v for kv in (await redis.hgetall(name)).items() for v in kv]
        elif kind == "zset":
            held = [m for m, _ in await redis.zrange(name, 0, -1, withscores=True)]
        elif kind == "set":
            held = list(await redis.smembers(name))
        else:
            held = list(await redis.lrange(name, 0, -1))
        out.append((name.decode(), name + b"\x00" + b"\x00".join(h for h in held if isinstance(h, bytes))))
    return out


async def archive_bytes(store: Store, prefix: str) -> list[tuple[str, bytes]]:
    """Every segment, decoded: each entry's fields (a version-2 entry is kept in base64)."""
    out = []
    for key in await store.list(prefix + "/"):
        _, entries = seg.read(await store.get(key))
        held = [e.envelope or b"" for e in entries] + [v for e in entries for v in (e.fields or {}).values()]
        out.append((key, b"\x00".join(held)))
    return out


def found_in(places: list[tuple[str, bytes]], needles: dict[str, bytes]) -> list[str]:
    return [f"{what} in {where}" for where, data in places for what, needle in needles.items() if needle in data]


@pytest.mark.parametrize("archive", ["directory", "s3"])
async def test_an_erased_customer_is_nowhere_after_the_sweep_and_a_full_replay(
    archive: str,
    request: pytest.FixtureRequest,
    edge: str,
    world: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    if archive == "s3":
        endpoint = request.getfixturevalue("s3")
        settings = settings.model_copy(
            update={"archive_url": f"s3://refstream-archive/{keys.prefix}", "archive_s3_endpoint": endpoint}
        )
    else:
        settings = archived(settings, tmp_path)
    store = open_store(settings)
    started = datetime.now(UTC) - timedelta(minutes=1)
    p = Person()
    key = world.api_key
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, source_ip=IP)
    assert status == 200, out
    click_id = out["click_id"]
    body = lead_body(click_id, customerExternalId=p.external_id, customerEmail=p.email, customerName=p.name)
    lead_headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"lead-{p.external_id}"}
    status, answer, _ = await call("POST", f"{edge}/api/track/lead", json=body, headers=lead_headers, source_ip=IP)
    assert status == 200 and answer["customer"]["email"] == p.email
    invoice = f"in-{secrets.token_hex(4)}"
    sale = sale_body(customerExternalId=p.external_id, invoiceId=invoice, metadata={"note": p.name})
    status, _, _ = await call(
        "POST", f"{edge}/api/track/sale", json=sale, headers={"Authorization": f"Bearer {key}"}, source_ip=IP
    )
    assert status == 200
    await drain()
    await run_archiver(settings, redis, store)
    # an edge's retry of the lead, still unread when the erasure comes (a copy: it counts nothing)
    (stream,) = [s for s in keys.streams if await redis.xlen(s)][:1] or [keys.streams[0]]
    for s in keys.streams:
        for _, fields in await redis.xrange(s):
            e = wire.from_entry(fields)
            if e.type is EventType.LEAD:
                await redis.xadd(s, fields)
                stream = s
    assert await redis.xlen(stream) >= 2
    before = await counters(pg)
    assert await pg.fetchval("SELECT count(*) FROM sales WHERE customer_external_id = $1", p.external_id) == 1
    assert before["links"][0][1:6] == (1, 1, 0, 1, 0)  # a click, a unique one, a lead
    assert not await reconcile(pg, fix=False)
    assert found_in([("postgres", pg_dump_text(settings.database_url))], p.needles)  # the test can fail

    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, done, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, done
    rows = done["done"]["postgres"]
    assert done["pending"] == ["redis", "archive"] and rows["events"] == 2  # the click and the lead
    assert rows["sales"] == 1 and rows["customers"] == 1
    # the copy is unread: the sweep leaves it to the workers, and says so
    first = await erasure.sweep(pg, redis, keys, store)
    assert first.entries_waiting >= 1 and not first.archive_done
    await drain()  # the copy: stored scrubbed by the ledger's check (a duplicate: counts nothing)
    await run_archiver(settings, redis, store)  # archived as it was sent: the archive pass rewrites it
    swept = await erasure.sweep(pg, redis, keys, store)
    assert swept.archive_done == [done["erasure_id"]] and swept.segments_rewritten >= 1, swept
    assert await erasure.status(pg) == []
    status, shown, _ = await call(
        "GET", f"{edge}/v1/erasures/{done['erasure_id']}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 200 and shown["status"] == "done" and shown["pending"] == []

    # a full replay from the archive, Redis trimmed: every event is there, scrubbed, once
    await trim.trim(redis, keys, 0, exact=True)
    replayed = await replay(Source(redis, store, keys.prefix), pg, keys, Range(since=started))
    assert replayed.total("archived") >= 4 and replayed.total("inserted") == 0
    assert await counters(pg) == before
    assert not await reconcile(pg, fix=False)
    places = [
        ("postgres", pg_dump_text(settings.database_url)),
        *await redis_bytes(redis, keys),
        *await archive_bytes(store, keys.prefix),
    ]
    assert not found_in(places, p.needles)
    # the rows are still there, as pseudonyms: the lead, its customer, the sale
    alias = await pg.fetchval("SELECT customer_external_id FROM events WHERE type = 2")
    assert ledger.is_pseudonym(alias)
    assert await pg.fetchval("SELECT customer_external_id FROM sales") == alias
    assert await pg.fetchval("SELECT customer_external_id FROM customer_leads") == alias  # the lead, kept
    assert await pg.fetchval("SELECT external_id FROM customers") == alias
    # a retry of the lead under its key is answered, without the person, and appends nothing
    status, again, headers = await call("POST", f"{edge}/api/track/lead", json=body, headers=lead_headers)
    assert status == 200 and headers[REPLAYED] == "true"
    assert again["customer"]["email"] is None and again["customer"]["externalId"] == alias
    assert sum([await redis.xlen(s) for s in keys.streams]) == 0


async def test_a_spool_drained_after_the_erasure_appends_the_event_scrubbed(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A lead spooled while Redis was away (an edge's disk) drains after its customer was
    erased: its stream entry, and the answer its key keeps, hold none of them."""
    p = Person()
    await customer(pg, world, "v-1", p)
    lead = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": "v-1",
            "external_id": p.external_id,
            "email": p.email,
            "customer_name": p.name,
            "name": "Sign Up",
        },
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )
    offline = tmp_path / "offline-spool"  # not the edge fixture's (settings.spool_dir): its drainer would race
    spool = Spool(offline, max_bytes=10_000_000)
    record = keys.idempotent("d" * 32, keys.partition_for(world.link["code"]))
    answer = b"f" * 32 + b"200" + orjson.dumps({"customer": {"externalId": p.external_id, "email": p.email}})
    await spool.append(keys.stream_for(world.link["code"]), wire.to_blob(lead), once=Once(record, answer, 60_000))
    await spool.close()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    again = Spool(offline, max_bytes=10_000_000)
    again._ledger = lambda: ledger.held(pg)
    assert await again.drain(redis) == 1
    await again.close()
    (entry,) = await redis.xrange(keys.stream_for(world.link["code"]))  # (the edge made the streams)
    e = wire.from_entry(entry[1])
    assert e.event_id == lead.event_id and e.ip is None and e.user_agent is None
    assert ledger.is_pseudonym(e.payload["external_id"]) and "email" not in e.payload
    kept = orjson.loads((await redis.get(record))[35:])  # the key's answer, for its repeats
    assert kept["customer"] == {"externalId": e.payload["external_id"], "email": None}
    assert not found_in(await redis_bytes(redis, keys), p.needles)


async def test_a_late_event_of_an_erased_person_is_stored_scrubbed_by_the_workers(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """An edge appends the person's lead as it was sent (it checks no ledger): the workers
    store it scrubbed, with the pseudonyms the erasure gave their customer row, and it
    counts as a lead (new data about the person is still a lead)."""
    p = Person()
    await customer(pg, world, "v-late", p)
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    late = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": "v-late",
            "external_id": p.external_id,
            "email": p.email,
            "customer_name": p.name,
            "name": "Sign Up",
        },
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )
    await redis.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(late))
    await drain()
    row = await pg.fetchrow("SELECT * FROM events WHERE event_id = $1", late.event_id)
    alias = await pg.fetchval("SELECT external_id FROM customers")
    assert row["customer_external_id"] == alias and ledger.is_pseudonym(alias)
    assert row["ip"] is row["user_agent"] is row["agent_id"] is None and "email" not in row["payload"]
    assert await pg.fetchval("SELECT visitor_id FROM customers") == row["visitor_id"]  # one customer, as before
    assert await pg.fetchval("SELECT count(*) FROM customers") == 1
    assert await pg.fetchval("SELECT leads FROM links") == 1
    assert not found_in([("postgres", pg_dump_text(settings.database_url))], p.needles)

    # a click the erasure could not know (no lead named it then), and a late lead naming it
    # as the person's: the click's row is scrubbed too, and its visitor joins the ledger
    click = Envelope(
        EventType.CLICK,
        Dialect.AFFITOR,
        {"code": world.link["code"], "visitor_id": "v-unknown", "referrer": "https://ref.test/unknown-click"},
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )
    click.payload["click_id"] = clicks.mint(click.event_id)
    await redis.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(click))
    await drain()
    assert await pg.fetchval("SELECT host(ip) FROM events WHERE event_id = $1", click.event_id) == IP
    later = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": "v-unknown",
            "click_id": click.payload["click_id"],
            "external_id": p.external_id,
            "name": "Upgrade",
        },
        world.workspace_id,
        IP,
    )
    await redis.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(later))
    await drain()
    row = await pg.fetchrow("SELECT ip, referrer, visitor_id FROM events WHERE event_id = $1", click.event_id)
    assert row["ip"] is None and row["referrer"] is None and ledger.is_pseudonym(row["visitor_id"])
    assert not found_in([("postgres", pg_dump_text(settings.database_url))], {**p.needles, "ref": b"unknown-click"})


async def test_a_visitors_raw_row_and_the_one_the_workers_made_under_its_pseudonym_become_one(
    world: World, pg: asyncpg.Pool
) -> None:
    """The workers made a visitor's row under its pseudonym (from a scrubbed copy) before the
    scrub of their raw row (a late lead taught the ledger that visitor): one row stays, the
    one seen first, with the furthest status either reached (a generative seed's sweep met
    the unique index here)."""
    p = Person()
    await customer(pg, world, "v-twin", p)
    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
        alias = ledger.pseudonym(key, ledger.VISITOR, "v-twin")
        await conn.execute(
            "INSERT INTO customers (workspace_id, visitor_id, status, first_seen_at, last_seen_at)"
            " VALUES ($1, $2, 3, now() + interval '1 minute', now() + interval '2 minutes')",
            world.workspace_id,
            alias,
        )
        first = await conn.fetchval("SELECT id FROM customers WHERE visitor_id = 'v-twin'")
        async with conn.transaction():
            await pg_erasure.scrub_rows(conn, key, world.workspace_id, None, ["v-twin"], [], None)
    rows = await pg.fetch("SELECT id, visitor_id, status, email, external_id FROM customers")
    assert [(r["id"], r["visitor_id"], r["status"], r["email"]) for r in rows] == [(first, alias, 3, None)]
    assert ledger.is_pseudonym(rows[0]["external_id"])


async def test_a_visitors_raw_day_and_the_one_a_scrubbed_copy_made_become_one_counted_once(
    world: World, pg: asyncpg.Pool
) -> None:
    """The kind of the test above, in the unique visitors: the workers counted a visitor's
    click under its pseudonym (a scrubbed copy) and its raw click on the same link and day
    as two visitor-days. The scrub renames the raw one onto the other: one row stays, and
    the link's and the day's unique clicks fall by the one it merged, so that every counter
    still equals its rows. Another visitor's day is untouched."""
    from workers.consumer.store import write_batch

    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
    alias = ledger.pseudonym(key, ledger.VISITOR, "v-pair")
    code = world.link["code"]

    def click(visitor: str) -> Envelope:
        payload = {"code": code, "visitor_id": visitor}
        return Envelope(EventType.CLICK, Dialect.BIORE, payload, world.workspace_id, "198.51.100.8", "Mozilla/5.0")

    assert (await write_batch(pg, [click("v-pair"), click(alias), click("v-other")])).inserted == 3
    days = "SELECT count(*) FROM link_visitor_days WHERE link_id = $1"
    unique = (
        "SELECT (SELECT unique_clicks FROM links WHERE id = $1),"
        " (SELECT sum(unique_clicks) FROM daily_stats WHERE link_id = $1)"
    )
    assert (
        tuple(await pg.fetchrow(unique, world.link["id"])) == (3, 3) and await pg.fetchval(days, world.link["id"]) == 3
    )
    async with pg.acquire() as conn, conn.transaction():
        await pg_erasure.scrub_rows(conn, key, world.workspace_id, None, ["v-pair"], [], None)
    keys = await pg.fetch("SELECT visitor_key FROM link_visitor_days WHERE link_id = $1", world.link["id"])
    assert sorted(r["visitor_key"] for r in keys) == sorted([alias, "v-other"])
    assert tuple(await pg.fetchrow(unique, world.link["id"])) == (2, 2)
    assert await unique_off(pg) == []


async def unique_off(pg: asyncpg.Pool) -> list[Any]:
    """The links whose unique clicks are not their visitor-days (the faults suite's I2)."""
    off: list[Any] = await pg.fetch(
        "SELECT l.code FROM links l"
        " WHERE l.unique_clicks <> (SELECT count(*) FROM link_visitor_days v WHERE v.link_id = l.id)"
    )
    return off


async def test_the_ledger_holds_no_personal_data_and_erase_needs_its_own_scope(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    p = Person()
    everything = await erase_key(pg, redis, keys, world, ["*"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {everything}"}
    )
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "erase"})
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202 and out["done"]["postgres"]["events"] == 0  # nobody by that id: recorded all the same
    rows = [tuple(r) for r in await pg.fetch("SELECT * FROM erasures")] + [
        tuple(r) for r in await pg.fetch("SELECT * FROM erased_ids")
    ]
    assert rows and not any(p.external_id in repr(r) for r in rows)
    prefix = eraser.split("_live_")[0] + "_live_"
    assert await pg.fetchval("SELECT requested_by FROM erasures") == eraser[: len(prefix) + 6]
    status, out, _ = await call("GET", f"{edge}/v1/erasures/nonsense", headers={"Authorization": f"Bearer {eraser}"})
    assert (status, out["error"]) == (404, "not_found")


async def test_refstream_erase_erases_and_reports_what_is_pending(
    procs: Procs, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    p = Person()
    await customer(pg, world, "v-9", p)
    out = await procs.cli("erase", "--customer", p.external_id, "--workspace", world.workspace_id)
    assert out["erasure"]["postgres"]["customers"] == 1
    assert out["pending"] == []  # nothing in Redis, no archive segment: done in one sweep
    row = await pg.fetchrow("SELECT external_id, email, name, visitor_id FROM customers")
    assert ledger.is_pseudonym(row["external_id"]) and row["email"] is None and row["name"] is None
    assert ledger.is_pseudonym(row["visitor_id"])
    status = await procs.cli("erase", "--status")
    assert status["pending"] == []
    code, _, err = await run_command("erase", "--customer", "x", env=env_for(procs.settings))
    assert code == 2 and "--customer needs --workspace" in err


async def test_an_erasure_whose_pseudonymous_dedupe_key_is_held_already_keeps_one_key(
    world: World, pg: asyncpg.Pool
) -> None:
    """A scrubbed copy of a lead can claim the pseudonym's dedupe key before the erasure (or
    its re-check) renames the raw one: the rename keeps the held key and drops the raw one,
    where it failed on the unique key (the generative hour on fc7b337, seed 1919904978)."""
    from workers.consumer import store

    p = Person()
    lead = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": "v-held",
            "external_id": p.external_id,
            "email": p.email,
            "name": "Sign Up",
        },
        world.workspace_id,
    )
    assert (await store.write_batch(pg, [lead])).inserted == 1
    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
    alias = ledger.pseudonym(key, ledger.EXTERNAL, p.external_id, world.workspace_id)
    await pg.execute(
        "INSERT INTO event_dedupe (workspace_id, type, dedupe_key, event_id, received_at) SELECT workspace_id, type,"
        " $2, event_id, received_at FROM event_dedupe WHERE event_id = $1",
        lead.event_id,
        f"lead\x1f{alias}\x1fSign Up",
    )
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    keys_left = [r["dedupe_key"] for r in await pg.fetch("SELECT dedupe_key FROM event_dedupe WHERE type = 2")]
    assert keys_left == [f"lead\x1f{alias}\x1fSign Up"]
