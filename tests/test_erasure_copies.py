"""Erasure reaching every copy of a person (docs/privacy.md, *An erasure*): the
stream entries of a person erased while the workers were stopped, the webhook outbox,
Affixo's fingerprint cache, a spool's click-cache entry, a ledger lost to a restore, and
the affiliates and participants themselves."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ingest.contract import erasure as ledger
from ingest.contract import wire
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.privacy import erasure as pg_erasure

from ._procs import Procs
from ._world import World, call
from .conftest import wait_for
from .test_erasure import IP, Person, customer, erase_key, found_in, redis_bytes
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead_body


def _doc(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def _holding(redis: Any, keys: Keys, needle: bytes) -> list[str]:
    """The stream entries of every partition that hold ``needle`` in any field."""
    out = []
    for s in keys.streams:
        for sid, fields in await redis.xrange(s):
            if any(needle in v for v in fields.values()):
                out.append(f"{s} {sid!r} {sorted(k for k, v in fields.items() if needle in v)}")
    return out


async def test_a_person_erased_while_the_workers_were_stopped_leaves_no_stream_entry(
    procs: Procs, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """The reproduction: the worker stopped, the person clicks (Affitor) and signs up
    (Refport); they are erased through the API, a second person through ``refstream
    erase``; the worker starts. Once nothing is pending, no stream entry holds their address."""
    archive = {"REFSTREAM_ARCHIVE_URL": f"file://{tmp_path / 'archive'}"}  # as compose.yaml deploys it
    edge = await procs.start_edge(**archive)
    await procs.cli("work", "--drain", **archive)  # the workers ran before: their groups are there
    procs.start("archive", **archive)
    p, q = Person(), Person()
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, source_ip=IP)
    assert status == 200, out
    body = lead_body(out["click_id"], customerExternalId=p.external_id, customerEmail=p.email, customerName=p.name)
    status, out, _ = await call(
        "POST", f"{edge}/api/track/lead", json=body, headers={"Authorization": f"Bearer {world.api_key}"}, source_ip=IP
    )
    assert status == 200, out
    assert len(await _holding(redis, keys, IP.encode())) == 2  # the test can fail
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out
    await procs.cli("erase", "--customer", q.external_id, "--workspace", world.workspace_id, **archive)
    procs.start("work", **archive)

    async def settled() -> bool:
        pending: list[Any] = (await procs.cli("erase", "--status", **archive))["pending"]
        return pending == []

    await wait_for(settled, timeout=90, what="every erasure done")
    assert await _holding(redis, keys, IP.encode()) == []
    assert await _holding(redis, keys, p.email.encode()) == []
    # nor any other key: the click's cache entry names the visitor the lead linked to the person
    visitor = await pg.fetchval("SELECT visitor_id FROM events WHERE type = 1")
    assert ledger.is_pseudonym(visitor)
    raw = await pg.fetchval("SELECT payload->>'click_id' FROM events WHERE type = 2")
    cached = await redis.get(keys.click(raw))
    assert cached is None or ledger.is_pseudonym(orjson.loads(cached)["v"]), cached
    assert not found_in(await redis_bytes(redis, keys), p.needles)


async def test_an_erasure_scrubs_the_commission_created_payloads_in_the_outbox(
    edge: str, world: World, pg: asyncpg.Pool, drain: Any
) -> None:
    """``commission.created`` is the commission's (its subject the ledger row, not an
    event): its payload's external id becomes the pseudonym, its amount stays."""
    from ingest.ledger import secretbox

    from .test_commissions import rules
    from .test_refunds import sold
    from .test_seed_004_refport import lead, new_click
    from .test_webhooks import make_webhook

    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    await make_webhook(
        pg,
        world.workspace_id,
        "https://hooks.example/h",
        secretbox.generate_key(),
        events=["commission.created", "sale.created"],
    )
    p = Person()
    click_id = await new_click(edge)
    body = lead_body(click_id, customerExternalId=p.external_id, customerEmail=p.email, customerName=p.name)
    assert (await lead(edge, world.api_key, body))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_erased", amount=5000, customerExternalId=p.external_id)
    held = await pg.fetch("SELECT payload FROM webhook_deliveries WHERE event_type = 'commission.created'")
    assert [_doc(r["payload"])["customer_external_id"] for r in held] == [p.external_id]  # can fail
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    alias = await pg.fetchval("SELECT customer_external_id FROM commissions")
    assert ledger.is_pseudonym(alias)
    kept = [_doc(r["payload"]) for r in await pg.fetch("SELECT payload FROM webhook_deliveries")]
    assert kept and not [d for d in kept if p.external_id in orjson.dumps(d).decode()], kept
    (made,) = [d for d in kept if "kind" in d]
    assert made["customer_external_id"] == alias and made["amount"] == 500


async def test_a_spool_drained_after_the_erasure_keeps_no_raw_click_cache_entry(
    world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A click spooled while Redis was away carries its click-cache entry (and an Affixo
    click its fingerprint's visitor) as extra commands: drained after its visitor was
    erased, the entry holds the visitor's pseudonym and the fingerprint is not remembered."""
    from ingest.contract import clicks
    from ingest.contract.events import Dialect, Envelope, EventType
    from ingest.spool.spool import Spool

    p = Person()
    visitor = f"v-spooled-{secrets.token_hex(4)}"
    await customer(pg, world, visitor, p)
    click = Envelope(
        EventType.CLICK,
        Dialect.AFFIXO,
        {"code": world.link["code"], "visitor_id": visitor},
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )
    click_id = clicks.mint(click.event_id)
    click.payload["click_id"] = click_id
    ref = clicks.ClickRef(click_id, world.link["code"], world.workspace_id, visitor, click.received_at_ms)
    fp = keys.fingerprint(world.workspace_id, "ab" * 16)
    offline = tmp_path / "offline-spool"
    spool = Spool(offline, max_bytes=10_000_000)
    await spool.append(
        keys.stream_for(world.link["code"]),
        wire.to_blob(click),
        extra=[ref.cache_command(keys, 3600), ("SET", fp, visitor, "NX", "EX", 3600)],
    )
    await spool.close()
    await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    again = Spool(offline, max_bytes=10_000_000)
    again._ledger = lambda: ledger.held(pg)
    assert await again.drain(redis) == 1
    await again.close()
    cached = clicks.decode(click_id, await redis.get(keys.click(click_id)))
    assert cached is not None and ledger.is_pseudonym(cached.visitor_id), cached
    assert await redis.get(fp) is None
    assert not found_in(await redis_bytes(redis, keys), {"visitor": visitor.encode(), **p.needles})


async def test_affixos_fingerprint_cache_hands_no_later_click_an_erased_visitor(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """A fingerprint remembers its first visitor for 90 days: once that visitor is erased,
    the sweep removes the entry, and the next click of the fingerprint is a new visitor."""
    from workers.ops import erasure

    from .test_seed_003_affixo import click

    fp = f"fp-{secrets.token_hex(4)}"
    _, first, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": fp})
    visitor = first["visitor_id"]
    _, again, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": fp})
    assert again["visitor_id"] == visitor  # the test can fail
    await drain()
    p = Person()  # the visitor signs up (their customers row, as a lead would make it)
    await pg.execute(
        "UPDATE customers SET external_id = $2, email = $3 WHERE visitor_id = $1", visitor, p.external_id, p.email
    )
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, out
    swept = await erasure.sweep(pg, redis, keys, None)
    assert swept.fingerprints_deleted == 1, swept
    assert not found_in(await redis_bytes(redis, keys), {"visitor": visitor.encode()})
    _, later, _ = await click(edge, world.api_key, {"ref": "PARTNER123", "fingerprint": fp})
    assert later["match_method"] == "new" and later["visitor_id"] != visitor


async def test_an_edge_that_has_not_read_the_salt_sets_no_fingerprint_entry_the_sweep_cannot_find(
    settings: Settings, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """The edge files each fingerprint entry it sets under its visitor's ledger digest, which
    needs the salt it reads from Postgres as it starts. The old edge, started while Postgres
    was away, set entries it could not file: an erased visitor stayed in them for 90 days,
    out of the sweep's reach. Until the salt is read it now sets none, on every path that
    sets one (Affixo's click with a visitor id, its lookup of a new fingerprint, the batch
    route's); once it is read, each entry it sets is filed."""
    from ingest.edge.state import EDGE

    from ._world import start_edge
    from .test_seed_003_affixo import bearer, click

    def batch(fp: str) -> dict[str, Any]:
        return {"json": [{"type": "click", "ref": "PARTNER123", "fingerprint": fp}], "headers": bearer(world.api_key)}

    def sent(fp: str, visitor: str | None = None) -> dict[str, Any]:
        return {"ref": "PARTNER123", "fingerprint": fp, **({"visitor_id": visitor} if visitor else {})}

    async def entries() -> dict[str, bytes]:
        found = {}
        async for name in redis.scan_iter(match=keys.fingerprint(world.workspace_id, "*"), count=1000):
            found[name.decode()] = await redis.get(name)
        return found

    runner, base = await start_edge(settings)
    away = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0)
    try:
        index = runner.app[EDGE].erasure_index
        assert index is not None

        async def read() -> bool:
            return index.salt is not None

        await wait_for(read, what="the salt read as the edge started")
        index.salt, index.pg = None, away  # as an edge that started while Postgres was away
        tag = secrets.token_hex(4)
        assert (await click(base, world.api_key, sent(f"a-{tag}", "vis_given")))[0] == 200
        assert (await click(base, world.api_key, sent(f"b-{tag}")))[0] == 200
        status, out, _ = await call("POST", f"{base}/v1/events/batch", **batch(f"c-{tag}"))
        assert status == 200 and out["accepted"] == 1, out
        assert await entries() == {}

        index.pg = pg  # Postgres back: the next request that would set an entry reads the salt
        await click(base, world.api_key, sent(f"d-{tag}"))

        await wait_for(read, what="the salt read")
        salt = index.salt
        assert salt is not None
        assert (await click(base, world.api_key, sent(f"a-{tag}", "vis_given")))[0] == 200
        _, fresh, _ = await click(base, world.api_key, sent(f"b-{tag}"))
        status, out, _ = await call("POST", f"{base}/v1/events/batch", **batch(f"c-{tag}"))
        assert status == 200, out
        set_now = await entries()
        assert sorted(v.decode() for v in set_now.values()) == sorted(
            ["vis_given", fresh["visitor_id"], out["results"][0]["visitor_id"]]
        ), set_now
        for name, visitor in set_now.items():
            index_key = keys.fingerprints_of(world.workspace_id, ledger.digest(salt, ledger.VISITOR, visitor.decode()))
            assert await redis.sismember(index_key, name.rpartition(":")[2]), (name, visitor)
    finally:
        await away.close()
        await runner.cleanup()


async def test_an_erasure_a_restore_of_postgres_lost_is_honoured_by_the_replay(
    edge: str, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """The ledger lives in Postgres; a restore of a backup from before the erasure loses it,
    and ``replay --since`` would store the person raw again. The erasure's copy in Redis is
    restored into Postgres before the replay stores anything: the person is stored scrubbed."""
    from datetime import UTC, datetime, timedelta

    from workers.ops.replay import Range, Source, replay

    from .test_erasure import pg_dump_text

    started = datetime.now(UTC) - timedelta(minutes=1)
    p = Person()
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK, source_ip=IP)
    assert status == 200, out
    body = lead_body(out["click_id"], customerExternalId=p.external_id, customerEmail=p.email, customerName=p.name)
    status, out, _ = await call(
        "POST", f"{edge}/api/track/lead", json=body, headers={"Authorization": f"Bearer {world.api_key}"}, source_ip=IP
    )
    assert status == 200, out
    await drain()
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, done, _ = await call(
        "DELETE", f"{edge}/v1/customers/{p.external_id}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 202, done
    assert await redis.hlen(f"{keys.prefix}:erasure:ledger") == 1
    # the restore: a backup from before the erasure (and before the person's rows) is back
    ids = [r["event_id"] for r in await pg.fetch("SELECT event_id FROM events")]
    await pg.execute("DELETE FROM event_dedupe WHERE event_id = ANY($1::uuid[])", ids)
    await pg.execute("DELETE FROM events WHERE event_id = ANY($1::uuid[])", ids)
    await pg.execute("DELETE FROM customers")
    await pg.execute("DELETE FROM erasures")  # and so its digests (erased_ids)
    assert await pg.fetchval("SELECT count(*) FROM erased_ids") == 0
    replayed = await replay(Source(redis), pg, keys, Range(since=started))
    assert replayed.total("inserted") == 2, replayed
    assert await pg.fetchval("SELECT count(*) FROM erasures WHERE id = $1::uuid", done["erasure_id"]) == 1
    rows = await pg.fetch("SELECT host(ip) AS ip, visitor_id, customer_external_id FROM events ORDER BY type")
    assert [r["ip"] for r in rows] == [None, None], rows
    assert all(ledger.is_pseudonym(r["visitor_id"]) for r in rows)
    assert ledger.is_pseudonym(rows[1]["customer_external_id"])
    assert not found_in([("postgres", pg_dump_text(settings.database_url))], p.needles)


async def test_an_affiliate_and_a_participant_are_erased_everywhere_their_money_stays(
    edge: str, procs: Procs, world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """``DELETE /v1/affiliates/{id}`` (scope ``erase``) and ``refstream erase --participant``:
    the affiliate's name, email, external id and addresses leave their row, ``affiliate_ips``,
    fraud evidence, webhook payloads and the link cache; their commission keeps its amount."""
    from ingest.ledger import secretbox

    from .test_commissions import rules
    from .test_erasure import pg_dump_text
    from .test_refunds import sold
    from .test_seed_004_refport import lead, new_click
    from .test_webhooks import make_webhook

    affiliate_ip = "127.0.0.77"
    email = f"partner.{secrets.token_hex(4)}@example.com"
    await pg.execute(
        "UPDATE affiliates SET email = $2, name = 'Alex Partnerson' WHERE id = $1::uuid", world.affiliate_id, email
    )
    await pg.execute(
        "INSERT INTO affiliate_ips (affiliate_id, ip) VALUES ($1::uuid, $2::inet)", world.affiliate_id, affiliate_ip
    )
    assert (await rules(edge, world, sale_bps=1000, hold_days=0))[0] == 200
    hook, _ = await make_webhook(
        pg,
        world.workspace_id,
        "https://hooks.example/h",
        secretbox.generate_key(),
        events=["fraud.flagged", "commission.created"],
    )
    click_id = await new_click(edge)
    assert (await lead(edge, world.api_key, lead_body(click_id)))[0] == 200
    await drain()
    await sold(edge, world, drain, invoiceId="in_aff", amount=5000)
    lead_id = await pg.fetchval("SELECT event_id FROM events WHERE type = 2")
    evidence = {"email": "alice@example.com", "affiliate_email": email, "match": "email"}
    await pg.execute(  # as the worker writes a flag (schema 17): its affiliate is its event's
        "INSERT INTO event_flags (event_id, rule, workspace_id, excluded, evidence)"
        " VALUES ($1, 'self_referral', $2::uuid, false, $3::text::jsonb)"
        " ON CONFLICT (event_id, rule) DO UPDATE SET evidence = EXCLUDED.evidence",
        lead_id,
        world.workspace_id,
        orjson.dumps(evidence).decode(),
    )
    flagged = {
        "event_id": str(lead_id),
        "affiliate_id": world.affiliate_id,
        "rule": "self_referral",
        "evidence": evidence,
    }
    await pg.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, payload) VALUES ($1::uuid,"
        " 'fraud.flagged', $2, $3::text::jsonb) ON CONFLICT (webhook_id, event_type, subject_id, subject_key)"
        " DO UPDATE SET payload = EXCLUDED.payload",
        hook,
        lead_id,
        orjson.dumps(flagged).decode(),
    )
    # a participant of the same workspace, in a second campaign
    program2 = await pg.fetchval(
        "INSERT INTO programs (workspace_id, name) VALUES ($1::uuid, 'Second') RETURNING id", world.workspace_id
    )
    participant = f"part-{secrets.token_hex(4)}"
    await pg.execute(
        "INSERT INTO affiliates (workspace_id, program_id, external_id, name, email) VALUES ($1::uuid, $2, $3, $3, $4)",
        world.workspace_id,
        program2,
        participant,
        f"{participant}@example.com",
    )
    await call("GET", f"{edge}/v1/links/{world.link['id']}", headers={"Authorization": f"Bearer {world.api_key}"})
    needles = {
        "email": email.encode(),
        "external id": b"user_123",
        "IP": affiliate_ip.encode(),
        "name": b"Alex Partnerson",
    }
    assert found_in([("postgres", pg_dump_text(settings.database_url))], needles)  # the test can fail
    commission = await pg.fetchrow("SELECT id, affiliate_id, amount FROM commissions")

    everything = await erase_key(pg, redis, keys, world, ["*"])
    path = f"{edge}/v1/affiliates/{world.affiliate_id}"
    status, out, _ = await call("DELETE", path, headers={"Authorization": f"Bearer {everything}"})
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "erase"})
    eraser = await erase_key(pg, redis, keys, world, ["erase"])
    status, out, _ = await call("DELETE", path, headers={"Authorization": f"Bearer {eraser}"})
    assert status == 202, out
    (made,) = out["erasures"]
    assert made["done"]["postgres"]["affiliate_ips"] == 1 and made["done"]["postgres"]["webhook_deliveries"] >= 1
    status, shown, _ = await call(
        "GET", f"{edge}/v1/erasures/{made['erasure_id']}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 200 and shown["erasure_id"] == made["erasure_id"]
    status, out, _ = await call(
        "DELETE", f"{edge}/v1/affiliates/{secrets.token_hex(4)}", headers={"Authorization": f"Bearer {eraser}"}
    )
    assert status == 404, out
    row = await pg.fetchrow("SELECT external_id, name, email FROM affiliates WHERE id = $1::uuid", world.affiliate_id)
    assert ledger.is_pseudonym(row["external_id"]) and row["name"] is None and row["email"] is None
    assert tuple(await pg.fetchrow("SELECT id, affiliate_id, amount FROM commissions")) == tuple(commission)
    places = [("postgres", pg_dump_text(settings.database_url)), *await redis_bytes(redis, keys)]
    assert not found_in(places, needles)
    # the link still resolves (a click is still the affiliate's), under the pseudonym
    status, _, _ = await call("POST", f"{edge}/api/v1/track/click", json=CLICK)
    assert status == 200

    out = await procs.cli("erase", "--participant", participant, "--workspace", world.workspace_id)
    assert len(out["erasures"]) == 1
    gone = await pg.fetchrow("SELECT external_id, name, email FROM affiliates WHERE program_id = $1", program2)
    assert ledger.is_pseudonym(gone["external_id"]) and gone["name"] is None and gone["email"] is None
    assert not found_in([("postgres", pg_dump_text(settings.database_url))], {"participant": participant.encode()})


async def test_an_affiliates_erasure_a_restore_lost_is_put_back_from_its_copy(
    world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """A restore of Postgres from before an affiliate's erasure brings their row back raw and
    the erasure gone: its copy in Redis puts the erasure back and scrubs the row again."""
    import uuid

    from ingest.privacy import erasure_affiliate, erasure_copy

    done = await erasure_affiliate.erase(
        pg, world.workspace_id, affiliate_id=world.affiliate_id, by="test", archive_days=30
    )
    made = [uuid.UUID(e["erasure_id"]) for e in done.erasures]
    assert await erasure_copy.keep(pg, redis, keys, made) == 1
    # the restore: the erasure gone, the row as it was before
    await pg.execute("DELETE FROM erasures")
    await pg.execute("UPDATE affiliates SET external_id = 'user_123', name = 'Alex', email = 'alex@example.com'")
    assert await erasure_copy.restore(pg, redis, keys) == 0  # no event row to scrub: the affiliate alone
    row = await pg.fetchrow("SELECT external_id, name, email FROM affiliates WHERE id = $1::uuid", world.affiliate_id)
    assert ledger.is_pseudonym(row["external_id"]) and row["name"] is None and row["email"] is None
    assert await pg.fetchval("SELECT postgres_at IS NOT NULL FROM erasures WHERE id = $1", made[0])


async def test_a_worker_restores_the_erasures_postgres_lost_before_its_first_batch(
    world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    """After a restore that lost an erasure, a worker's first batch waits for the ledger's
    copy: a lead of the person still in the stream is stored scrubbed."""
    import uuid

    from ingest.contract.events import Dialect, Envelope, EventType
    from ingest.privacy import erasure_copy

    p = Person()
    await customer(pg, world, "v-restored", p)
    done = await pg_erasure.erase(pg, world.workspace_id, p.external_id, by="test", archive_days=30)
    assert await erasure_copy.keep(pg, redis, keys, [done.id]) == 1
    await pg.execute("DELETE FROM erasures")  # the restore
    await redis.hset(erasure_copy.key(keys), "junk", b"not a copy")  # names nobody, stops nothing
    lead = Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {
            "code": world.link["code"],
            "visitor_id": "v-restored",
            "external_id": p.external_id,
            "email": p.email,
            "customer_name": p.name,
            "name": "Sign Up",
        },
        world.workspace_id,
        IP,
        "Mozilla/5.0",
    )
    await redis.xadd(keys.stream_for(world.link["code"]), wire.to_entry_dict(lead))
    await drain()
    row = await pg.fetchrow(
        "SELECT host(ip) AS ip, customer_external_id, payload FROM events WHERE event_id = $1", lead.event_id
    )
    assert row["ip"] is None and ledger.is_pseudonym(row["customer_external_id"]), row
    assert await pg.fetchval("SELECT count(*) FROM erasures WHERE id = $1", uuid.UUID(str(done.id))) == 1
