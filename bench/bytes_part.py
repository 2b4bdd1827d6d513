"""Part (pgbytes), only when named: what Postgres stores per click, by table and by index.

``--pgbytes-clicks`` realistic clicks (three dialects, distinct visitors and addresses, a
few bots) with leads on 3 % of them, conversions on 0.5 % and sales on 1 % are appended to
the streams as the edge would, and stored by a real ``refstream work --drain`` into a fresh
copy of the world's database. Then ``VACUUM (ANALYZE)`` (the visibility and free-space maps
autovacuum would make) and the size of every relation that grew, partitions summed under
their parent table or index: bytes per stored click, the leads', conversions' and sales'
rows and their indexes included (they are what a click brings).

Sizes are of pages, not of timings: one run is the A/B of an index change (the generator
is seeded; only the ids' clock and the worker's batch boundaries vary between runs, a few
bytes per click at most)."""

from __future__ import annotations

import asyncio
import random
import secrets
from typing import Any

import asyncpg

from ingest.contract import clicks
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import to_entry_dict

from .cap_meter import _RELATIONS
from .context import Ctx
from .world import UAS, backlog, client_ip, copy_database

LEAD_SHARE, CONVERSION_SHARE, SALE_SHARE = 0.03, 0.005, 0.01
# browsers mostly; Googlebot's share is the bot traffic a public link sees
UA_WEIGHTS = (0.45, 0.3, 0.2, 0.05)
_REFERRERS = ("https://blog.example.com/post/best-tools", "https://t.co/abc123", "https://www.google.com/", None)


def _visitor(rng: random.Random) -> str:
    return "v_" + "".join(rng.choice("0123456789abcdef") for _ in range(20))


def realistic(world_codes: list[str], workspace_id: str, n: int, rng: random.Random) -> list[Envelope]:
    """``n`` clicks in id order, and the leads, conversions and sales some of them bring."""
    out: list[Envelope] = []
    tracked: list[tuple[str, str, str]] = []  # (code, click id, visitor) of clicks a lead may name
    customers: list[str] = []
    run = secrets.token_hex(3)  # dedupe keys and invoices are per run
    visitors: list[str] = []
    for i in range(n):
        code = rng.choice(world_codes)
        # a returning visitor one time in five
        visitor = rng.choice(visitors) if visitors and rng.random() < 0.2 else _visitor(rng)
        visitors.append(visitor)
        ip, ua = client_ip(rng.randrange(1_000_000)), rng.choices(UAS, UA_WEIGHTS)[0]
        referrer = rng.choice(_REFERRERS)
        kind = rng.random()
        if kind < 0.6:  # Affitor: the click mints the id its lead will name
            cid = clicks.mint(eid := uuid7())
            payload: dict[str, Any] = {
                "code": code,
                "click_id": cid,
                "visitor_id": visitor,
                "page_url": "https://yoursite.com/pricing",
            }
            if referrer:
                payload["referrer"] = referrer
            tracked.append((code, cid, visitor))
            out.append(Envelope(EventType.CLICK, Dialect.AFFITOR, payload, workspace_id, ip, ua, eid))
        elif kind < 0.85:  # bio.re: no visitor id, the browser is the visitor
            payload = {"code": code, "referrer": "https://bio.re/alex"}
            out.append(Envelope(EventType.CLICK, Dialect.BIORE, payload, workspace_id, ip, ua))
        else:
            payload = {"code": code, "visitor_id": visitor, "match": "cookie"}
            out.append(Envelope(EventType.CLICK, Dialect.NATIVE, payload, workspace_id, ip, ua))
        if tracked and rng.random() < LEAD_SHARE:
            lead_code, cid, lead_visitor = rng.choice(tracked)
            customer = f"cus_{run}_{i}"
            customers.append(customer)
            payload = {
                "code": lead_code,
                "click_id": cid,
                "visitor_id": lead_visitor,
                "name": "Sign Up",
                "external_id": customer,
                "email": f"{customer}@example.com",
            }
            out.append(Envelope(EventType.LEAD, Dialect.REFPORT, payload, workspace_id, client_ip(i)))
        if rng.random() < CONVERSION_SHARE:
            payload = {"code": code, "visitor_id": visitor, "dedupe": f"{code}:{run}-{i}"}
            out.append(Envelope(EventType.CONVERSION, Dialect.BRICQS, payload, workspace_id))
        if customers and rng.random() < SALE_SHARE:
            payload = {
                "external_id": rng.choice(customers),
                "amount": rng.randrange(500, 20_000),
                "currency": "usd",
                "name": "Purchase",
                "processor": "stripe",
                "invoice": f"in_{run}_{i}",
            }
            out.append(Envelope(EventType.SALE, Dialect.REFPORT, payload, workspace_id))
    return out


async def _fill(ctx: Ctx, keys: Keys, envelopes: list[Envelope]) -> None:
    """Appended as the edge appends them: each to its routing key's partition."""
    for stream in keys.streams:
        await ctx.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for start in range(0, len(envelopes), 5000):
        pipe = ctx.redis.pipeline(transaction=False)
        for e in envelopes[start : start + 5000]:
            pipe.xadd(keys.stream_for(e.routing_key() or ""), to_entry_dict(e))  # type: ignore[arg-type]
        await pipe.execute()


# what one stored click's row holds, column by column (pg_column_size: a value as stored, after
# any compression; NULL is 0, its bit in the null bitmap aside), and the whole row as a datum
# (its 24-byte header and null bitmap included; on the heap each row costs a 4-byte line
# pointer and alignment to 8 besides). Columns read from the catalog, so the figures follow
# the table as it is
_COLUMNS = """
SELECT attname::text AS name FROM pg_attribute
WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""


def _column_sizes(columns: list[str]) -> str:
    sizes = ", ".join(f'avg(coalesce(pg_column_size(e."{c}"), 0))::float8 AS "{c}"' for c in columns)
    return f'SELECT {sizes}, avg(pg_column_size(e.*))::float8 AS "(row)" FROM events e WHERE type = 1'


_COUNTS = """
SELECT count(*) FILTER (WHERE type = 1) AS clicks, count(*) FILTER (WHERE type = 2) AS leads,
       count(*) FILTER (WHERE type = 3) AS conversions, (SELECT count(*) FROM sales) AS sales
FROM events
"""


async def part_pgbytes(ctx: Ctx) -> None:
    """(pgbytes) bytes per stored click, by relation, after ``work --drain`` and VACUUM."""
    n = ctx.opts.pgbytes_clicks
    envelopes = realistic(ctx.world.codes, ctx.world.workspace_id, n, random.Random(20_000))
    keys = ctx.keys("pgbytes")
    db = await copy_database(ctx.world, f"{ctx.world.database}_r{ctx.run}_pgbytes")
    conn = await asyncpg.connect(ctx.world.url(db))
    try:
        before = {r["name"]: r["bytes"] for r in await conn.fetch(_RELATIONS)}
        await _fill(ctx, keys, envelopes)
        worker = ctx.procs.refstream(
            "worker-pgbytes", "work", "--drain", DATABASE_URL=ctx.world.url(db), REFSTREAM_STREAM_PREFIX=keys.prefix
        )
        if await asyncio.to_thread(worker.wait, 600) != 0:
            raise RuntimeError(f"work --drain failed: {ctx.procs.tail('worker-pgbytes')}")
        if (left := (await backlog(ctx.redis, keys))[0]) != 0:
            raise RuntimeError(f"work --drain left {left} entries")
        await conn.execute("VACUUM (ANALYZE)")
        after = {r["name"]: r["bytes"] for r in await conn.fetch(_RELATIONS)}
        counts = await conn.fetchrow(_COUNTS)
        columns = dict(await conn.fetchrow(_column_sizes([r["name"] for r in await conn.fetch(_COLUMNS)])))
    finally:
        await conn.close()
    stored = counts["clicks"]
    if stored == 0:
        raise RuntimeError("no click stored")
    for kind in ("clicks", "leads", "conversions", "sales"):
        ctx.note(f"pgbytes.{kind}", counts[kind])
    # the application's relations: the catalogs grow by ANALYZE's statistics, not per click
    grown = {
        name: after[name] - before.get(name, 0)
        for name in after
        if after[name] != before.get(name, 0) and not name.startswith("pg_")
    }
    for name, size in sorted(grown.items(), key=lambda kv: -kv[1]):
        ctx.note(f"pgbytes.per_click.{name}", size / stored)
    for name, size in columns.items():
        ctx.note(f"pgbytes.click_column.{name}", size or 0.0)
    events = await _events_relations(ctx, db)
    ctx.note("pgbytes.per_click.events_with_indexes", sum(grown.get(r, 0) for r in events) / stored)
    ctx.note("pgbytes.per_click.events_indexes", sum(grown.get(r, 0) for r in events if r != "events") / stored)
    ctx.note("pgbytes.per_click.total", sum(grown.values()) / stored)


async def _events_relations(ctx: Ctx, db: str) -> set[str]:
    """``events`` and the names of its (parent) indexes."""
    conn = await asyncpg.connect(ctx.world.url(db))
    try:
        rows = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = 'events'::regclass"
        )
    finally:
        await conn.close()
    return {"events", *(r["name"] for r in rows)}
