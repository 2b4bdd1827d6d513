"""Erasure between workspaces (docs/privacy.md, *Between workspaces*): a visitor id, a session id or
an import's id is chosen by a workspace's client, and two workspaces' clients choose alike
(``v-1001`` in two workspaces' trackers). One workspace's erasure never touches the other's
person: not their customer row, their email, their lead, their sale's attribution or their
commission, not through the erasure, the sweep's re-check, the workers' ledger check or an
import; and deleting one workspace leaves the other's erasure standing for a later import."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import erasure as ledger
from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from ingest.spool.spool import Spool
from workers.archive.store import open_store
from workers.ops import erasure

from ._world import World, call, make_world
from .test_archive import archived, run_archiver
from .test_erasure import archive_bytes
from .test_import import import_cli
from .test_sales import sale_body, track_sale
from .test_seed_001_bricqs import generate

SHARED = "v-1001"  # a visitor id two workspaces' trackers chose alike ("undefined" is no id: a placeholder)
REFERRER = "https://blog.example/shared-post"


def _at(days_ago: float, minutes: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago) + timedelta(minutes=minutes)).isoformat()


def _history(code: str, customer: str, email: str, visitor: str = SHARED) -> list[dict[str, Any]]:
    """A click under ``visitor`` and a lead of ``customer`` on it, days ago."""
    return [
        {
            "type": "click",
            "id": "c1",
            "timestamp": _at(3),
            "link": code,
            "ip": "203.0.113.9",
            "visitor_id": visitor,
            "referrer": REFERRER,
        },
        {"type": "lead", "id": "l1", "timestamp": _at(3, 5), "click": "c1", "customer_id": customer, "email": email},
    ]


async def _import(settings: Settings, tmp_path: Path, world: World, rows: list[dict[str, Any]]) -> None:
    path = tmp_path / f"history-{secrets.token_hex(4)}.ndjson"
    path.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    out = await import_cli(settings, path, world)
    assert out["stored"] == len(rows), out


async def _eraser(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World) -> str:
    async with pg.acquire() as conn:
        made = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["erase"])
    return str(made["api_key"])


async def _erase(edge: str, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, external_id: str) -> None:
    key = await _eraser(pg, redis, keys, world)
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{external_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert status == 202, out


async def _sweep(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """Two sweeps: the first re-checks Postgres, the second finds the ledger as the first left it."""
    for _ in range(2):
        await erasure.sweep(pg, redis, keys, None)


async def _state(pg: asyncpg.Pool, world: World) -> dict[str, Any]:
    """Everything of a workspace an erasure elsewhere must leave as it is."""
    ws = world.workspace_id
    return {
        "customers": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT external_id, visitor_id, email, status FROM customers WHERE workspace_id = $1 ORDER BY id", ws
            )
        ],
        "events": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT event_id, type, visitor_id, customer_external_id, host(ip), referrer, payload::text FROM events"
                " WHERE workspace_id = $1 ORDER BY event_id",
                ws,
            )
        ],
        "sales": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT event_id, customer_external_id, link_id, affiliate_id, metadata::text FROM sales"
                " WHERE workspace_id = $1 ORDER BY event_id",
                ws,
            )
        ],
        "commissions": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT c.* FROM commissions c JOIN affiliates a ON a.id = c.affiliate_id WHERE a.workspace_id = $1"
                " ORDER BY 1",
                ws,
            )
        ],
    }


async def _alice_gone(pg: asyncpg.Pool, world: World, email: str) -> None:
    ws = world.workspace_id
    row = await pg.fetchrow("SELECT external_id, visitor_id, email FROM customers WHERE workspace_id = $1", ws)
    assert ledger.is_pseudonym(row["external_id"]) and ledger.is_pseudonym(row["visitor_id"]) and row["email"] is None
    assert not await pg.fetchval(
        "SELECT count(*) FROM events WHERE workspace_id = $1 AND (visitor_id = $2 OR referrer IS NOT NULL"
        " OR ip IS NOT NULL OR payload::text LIKE '%' || $3 || '%')",
        ws,
        SHARED,
        email,
    )


@pytest.fixture
async def other(pg: asyncpg.Pool, redis: Any, keys: Keys) -> World:
    return await make_world(pg, redis, keys, code="OTHERWS", name="Other")


async def test_an_erasure_in_one_workspace_leaves_anothers_person_of_the_same_visitor_id(
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    """Alice in A and Bob in B, each imported on a click of visitor ``v-1001``, a live sale
    of Bob's in B; Alice's erasure in A, the sweep, then another sale of Bob's: Bob's rows,
    attribution and commissions in B are as they were, the new sale his too; Alice is gone."""
    await pg.execute('UPDATE programs SET commission = \'{"sale_bps": 1000, "lead_flat": 300}\'')
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example"))
    await _import(settings, tmp_path, other, _history(other.link["code"], "bob", "bob@b.example"))
    status, _, _ = await call(
        "POST",
        f"{edge}/api/track/sale",
        headers={"Authorization": f"Bearer {other.api_key}"},
        json=sale_body(customerExternalId="bob", invoiceId="inv-b1"),
    )
    assert status == 200
    await drain()
    before = await _state(pg, other)
    assert [c[:3] for c in before["customers"]] == [("bob", SHARED, "bob@b.example")], before  # can fail
    assert before["sales"][0][2] is not None and before["commissions"], before  # attributed, and paid on

    await _erase(edge, pg, redis, keys, world, "alice")
    await _sweep(pg, redis, keys)
    assert await _state(pg, other) == before
    await _alice_gone(pg, world, "alice@a.example")

    # Bob's next sale still finds his lead: attributed, and a commission of its own
    status, _, _ = await call(
        "POST",
        f"{edge}/api/track/sale",
        headers={"Authorization": f"Bearer {other.api_key}"},
        json=sale_body(customerExternalId="bob", invoiceId="inv-b2"),
    )
    assert status == 200
    await drain()
    after = await _state(pg, other)
    assert after["customers"] == before["customers"]
    assert [s[1:4] for s in after["sales"]] == [before["sales"][0][1:4]] * 2
    assert len(after["commissions"]) == len(before["commissions"]) + 1


async def _affixo(edge: str, world: World, visitor: str, again: bool) -> None:
    body = {"ref": world.link["code"], "visitor_id": visitor, "url": "https://yoursite.com/", "referrer": REFERRER}
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/click", json=body, headers={"Authorization": f"Bearer {world.api_key}"}
    )
    assert status == 200, out


async def _batch(edge: str, world: World, visitor: str, again: bool) -> None:
    items = [
        {
            "type": "click",
            "ref": world.link["code"],
            "visitor_id": visitor,
            "ip": "81.2.69.160",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",
        }
    ]
    status, out, _ = await call(
        "POST", f"{edge}/v1/events/batch", json=items, headers={"Authorization": f"Bearer {world.api_key}"}
    )
    assert status == 200 and out["accepted"] == 1, out


async def _bricqs(edge: str, world: World, visitor: str, again: bool) -> None:
    code = world.link["code"]
    if again:  # a conversion is once per code and session: the session's next is by another's code
        code = (await generate(edge, world.api_key, "carol", world.program_id))[1]["code"]
    body = {"code": code, "referred_session_id": visitor}
    status, out, _ = await call("POST", f"{edge}/api/v1/referrals/convert", json=body)
    assert status == 200 and out["converted"] is True, out


async def _entries(redis: Any, keys: Keys, world: World) -> list[tuple[Any, bytes]]:
    """The workspace's stream entries, read and acked by the workers and not yet trimmed."""
    out = []
    for s in keys.streams:
        for sid, fields in await redis.xrange(s):
            if wire.from_entry(fields).workspace_id == world.workspace_id:
                out.append((sid, orjson.dumps({k.decode(): v.decode(errors="replace") for k, v in fields.items()})))
    return out


@pytest.mark.parametrize("door", [_affixo, _batch, _bricqs], ids=["affixo", "batch", "bricqs"])
async def test_a_shared_client_chosen_id_erased_in_one_workspace_stays_in_another(
    door: Any,
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    """B's visitor ``v-1001`` (an Affixo ``visitor_id``, a batch click's ``visitor_id``, a
    Bricqs ``referred_session_id``) before and after A erases its Alice of the same visitor
    id: B's rows are untouched by the erasure and its sweep, and B's later event of that
    visitor is stored as sent, not scrubbed by the workers' ledger check."""
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example"))
    await door(edge, other, SHARED, False)
    await drain()
    before = await _state(pg, other)
    assert [c[1] for c in before["customers"]] == [SHARED] and before["events"], before
    entries = await _entries(redis, keys, other)
    assert entries and all(SHARED.encode() in e for _, e in entries)
    await _erase(edge, pg, redis, keys, world, "alice")
    await _sweep(pg, redis, keys)
    assert await _state(pg, other) == before
    assert await _entries(redis, keys, other) == entries  # the sweep's Redis pass left B's entries as they were
    await _alice_gone(pg, world, "alice@a.example")
    await door(edge, other, SHARED, True)  # after the erasure: B's, stored as sent
    await drain()
    later = await _state(pg, other)
    assert len(later["events"]) == len(before["events"]) + 1
    assert all(e[2] == SHARED for e in later["events"]), later["events"]
    assert [c[1] for c in later["customers"]] == [SHARED]


async def test_deleting_a_workspace_leaves_anothers_erasure_of_the_same_id_honoured(
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    """A and B each erase their person of visitor ``v-1001`` (A first). A is deleted; a later
    import into B of a click of that visitor is stored scrubbed: B's erasure still holds."""
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example"))
    await _import(settings, tmp_path, other, _history(other.link["code"], "bob", "bob@b.example"))
    await _erase(edge, pg, redis, keys, world, "alice")
    await _erase(edge, pg, redis, keys, other, "bob")
    await _sweep(pg, redis, keys)
    await pg.execute("DELETE FROM workspaces WHERE id = $1", world.workspace_id)
    assert not await pg.fetchval("SELECT count(*) FROM erasures WHERE workspace_id = $1", world.workspace_id)
    late = {
        "type": "click",
        "id": "c9",
        "timestamp": _at(1),
        "link": other.link["code"],
        "ip": "203.0.113.10",
        "visitor_id": SHARED,
        "referrer": REFERRER,
    }
    await _import(settings, tmp_path, other, [late])
    rows = await pg.fetch(
        "SELECT visitor_id, ip, referrer FROM events WHERE workspace_id = $1 AND type = 1", other.workspace_id
    )
    assert len(rows) == 2
    assert all(ledger.is_pseudonym(r["visitor_id"]) and r["ip"] is None and r["referrer"] is None for r in rows), rows


async def test_an_entry_of_the_global_ledger_keeps_protecting_after_the_migration(
    world: World, other: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A database of schema 10: one global entry of visitor ``v-1001``, held by A's erasure
    (B's erasure of its own person of that visitor found it held and wrote none). Migrated,
    the entry protects A and B each (B's erasure still holds for an import into B) and goes
    with A's erasure only for A; a workspace with no erasure is not B's or A's to scrub."""
    from ingest.manage.db import migrate

    third = await make_world(pg, redis, keys, code="THIRDWS", name="Third")
    async with pg.acquire() as conn:
        key = await ledger.salt(conn)
        await conn.execute(
            "ALTER TABLE erased_ids DROP CONSTRAINT erased_ids_pkey; ALTER TABLE erased_ids DROP COLUMN workspace_id;"
            " ALTER TABLE erased_ids ADD PRIMARY KEY (digest)"
        )
        ids = {}
        for w, who in ((world, "alice"), (other, "bob")):
            subject = ledger.digest(key, ledger.EXTERNAL, who, w.workspace_id)
            ids[w.workspace_id] = await conn.fetchval(
                "INSERT INTO erasures (id, workspace_id, subject, requested_by, archive_due, postgres_at)"
                " VALUES (gen_random_uuid(), $1, $2, 'test', now() + interval '30 days', now()) RETURNING id",
                w.workspace_id,
                subject,
            )
            await conn.execute(
                "INSERT INTO erased_ids (digest, erasure_id, kind) VALUES ($1, $2, 'x')", subject, ids[w.workspace_id]
            )
        shared = ledger.digest(key, ledger.VISITOR, SHARED)
        await conn.execute(
            "INSERT INTO erased_ids (digest, erasure_id, kind) VALUES ($1, $2, 'v')", shared, ids[world.workspace_id]
        )
        await migrate(conn)
        await migrate(conn)  # a second run changes nothing
        held = {
            (str(r["workspace_id"]), r["erasure_id"])
            for r in await conn.fetch("SELECT workspace_id, erasure_id FROM erased_ids WHERE digest = $1", shared)
        }
    assert held == {(world.workspace_id, ids[world.workspace_id]), (other.workspace_id, ids[other.workspace_id])}
    late = {
        "type": "click",
        "id": "c9",
        "timestamp": _at(1),
        "link": other.link["code"],
        "ip": "203.0.113.10",
        "visitor_id": SHARED,
        "referrer": REFERRER,
    }
    await _import(settings, tmp_path, other, [late])
    await _import(settings, tmp_path, third, [{**late, "link": third.link["code"]}])
    rows = {str(r["workspace_id"]): r for r in await pg.fetch("SELECT workspace_id, visitor_id, ip FROM events")}
    assert ledger.is_pseudonym(rows[other.workspace_id]["visitor_id"]) and rows[other.workspace_id]["ip"] is None
    assert rows[third.workspace_id]["visitor_id"] == SHARED


async def test_the_archive_pass_leaves_another_workspaces_entries_of_a_shared_visitor_id(
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    drain: Any,
    tmp_path: Path,
) -> None:
    """B's Affixo click of visitor ``v-1001``, archived; A erases its Alice of that visitor
    id, and the sweep's archive pass runs to done: B's segment is as it was."""
    settings = archived(settings, tmp_path)
    store = open_store(settings)
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example"))
    await _affixo(edge, other, SHARED, False)
    await drain()
    await run_archiver(settings, redis, store)
    before = await archive_bytes(store, keys.prefix)
    assert before and any(REFERRER.encode() in held for _, held in before)  # the test can fail
    await _erase(edge, pg, redis, keys, world, "alice")
    for _ in range(3):
        await erasure.sweep(pg, redis, keys, store)
    assert await erasure.status(pg) == []  # the archive pass ran, and is done
    assert await archive_bytes(store, keys.prefix) == before


async def test_a_spool_drained_after_an_erasure_elsewhere_appends_the_other_workspaces_event_as_sent(
    edge: str,
    world: World,
    other: World,
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """B's click of visitor ``v-1001`` spooled while Redis was away drains after A erased
    its Alice of that visitor id: the drain's ledger check appends it as it was sent."""
    await _import(settings, tmp_path, world, _history(world.link["code"], "alice", "alice@a.example"))
    await _erase(edge, pg, redis, keys, world, "alice")
    click = Envelope(
        EventType.CLICK,
        Dialect.AFFIXO,
        {"code": other.link["code"], "visitor_id": SHARED, "referrer": REFERRER},
        other.workspace_id,
        "127.0.0.9",
        "Mozilla/5.0",
    )
    offline = tmp_path / "offline-spool"  # not the edge fixture's (settings.spool_dir): its drainer would race
    spool = Spool(offline, max_bytes=10_000_000)
    await spool.append(keys.stream_for(other.link["code"]), wire.to_blob(click))
    await spool.close()
    again = Spool(offline, max_bytes=10_000_000)
    again._ledger = lambda: ledger.held(pg)
    assert await again.drain(redis) == 1
    await again.close()
    (entry,) = await redis.xrange(keys.stream_for(other.link["code"]))
    assert wire.from_entry(entry[1]) == click


async def test_a_shared_customer_id_erased_in_one_workspace_leaves_anothers_repeated_answer(
    edge: str, world: World, other: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """A's and B's clients each sell to their customer ``shared`` under an Idempotency-Key;
    A erases its ``shared`` and the sweep runs: a repeat of B's sale is answered as it first
    was, naming B's customer, and a repeat of A's names A's pseudonym. (The generative
    test's seed 676915399: the sweep tried every erasing workspace's terms on an answer
    that did not say whose it was, and rewrote B's.)"""
    sales = {
        "a": (world, sale_body(customerExternalId="shared", invoiceId="in-a"), "key-a"),
        "b": (other, sale_body(customerExternalId="shared", invoiceId="in-b"), "key-b"),
    }
    first = {}
    for tag, (w, body, key) in sales.items():
        status, out, _ = await track_sale(edge, w.api_key, body, **{"Idempotency-Key": key})
        assert status == 200 and out["customer"]["externalId"] == "shared", (tag, out)
        first[tag] = out
    await drain()
    await _erase(edge, pg, redis, keys, world, "shared")
    await _sweep(pg, redis, keys)
    again = {}
    for tag, (w, body, key) in sales.items():
        status, out, headers = await track_sale(edge, w.api_key, body, **{"Idempotency-Key": key})
        assert status == 200 and headers.get("Idempotent-Replayed") == "true", (tag, status, out)
        again[tag] = out
    assert again["b"] == first["b"]  # B's customer, as first answered
    pseudonym = again["a"]["customer"]["externalId"]
    assert pseudonym != "shared" and ledger.is_pseudonym(pseudonym), again["a"]


async def test_a_repeat_after_the_upgrade_gets_the_answer_an_older_edge_recorded(
    edge: str, world: World, redis: Any, keys: Keys, drain: Any, pg: asyncpg.Pool
) -> None:
    """A record an edge wrote before records named their workspace (the same record, under
    the name without it): a repeat of its key is answered from it and appends nothing."""
    body = sale_body(customerExternalId="upgraded", invoiceId="in-up")
    status, first, _ = await track_sale(edge, world.api_key, body, **{"Idempotency-Key": "key-up"})
    assert status == 200, first
    names = [n async for n in redis.scan_iter(match=f"{keys.prefix}:idk:*")]
    assert len(names) == 1 and Keys.record_workspace(names[0].decode()) == world.workspace_id, names
    old = names[0].decode().replace(f":{world.workspace_id}:", ":")
    await redis.rename(names[0], old)  # as an older edge named it
    status, again, headers = await track_sale(edge, world.api_key, body, **{"Idempotency-Key": "key-up"})
    assert status == 200 and headers.get("Idempotent-Replayed") == "true" and again == first, again
    await drain()
    n = await pg.fetchval(
        "SELECT count(*) FROM sales WHERE workspace_id = $1 AND customer_external_id = 'upgraded'", world.workspace_id
    )
    assert n == 1
