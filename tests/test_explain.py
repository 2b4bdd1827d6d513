"""Every read the management API makes uses an index, on tables large enough for the planner
to care: 200,000 events over five daily partitions, 20,000 links, 50,000 customers and
daily rows, analyzed; the plans name index scans and no sequential scan of the table."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.manage import ledger, manage, stats
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_late
from refstream.console import ring, tail
from workers.consumer.partitions import maintain

# the planner over generated rows: the same Postgres either way:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = pytest.mark.once

DAY = date(2033, 1, 5)

_FILL = [
    # 20 workspaces, a program each, 100 affiliates each, 10 links per affiliate
    """INSERT INTO workspaces (id, name)
       SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(w), 12, '0'))::uuid, 'ws' || w
       FROM generate_series(1, 20) w""",
    """INSERT INTO programs (id, workspace_id, name)
       SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(w), 12, '0'))::uuid,
              ('00000000-0000-4000-8000-' || lpad(to_hex(w), 12, '0'))::uuid, 'p' FROM generate_series(1, 20) w""",
    """INSERT INTO affiliates (id, workspace_id, program_id, external_id)
       SELECT ('00000000-0000-4000-a000-' || lpad(to_hex(a), 12, '0'))::uuid,
              ('00000000-0000-4000-8000-' || lpad(to_hex(a % 20 + 1), 12, '0'))::uuid,
              ('00000000-0000-4000-9000-' || lpad(to_hex(a % 20 + 1), 12, '0'))::uuid, 'a' || a
       FROM generate_series(1, 2000) a""",
    """INSERT INTO links (id, workspace_id, program_id, affiliate_id, code, url)
       SELECT ('00000000-0000-4000-b000-' || lpad(to_hex(l), 12, '0'))::uuid, a.workspace_id, a.program_id, a.id,
              'L' || l, 'https://example.com/'
       FROM generate_series(1, 20000) l
       JOIN affiliates a ON a.id = ('00000000-0000-4000-a000-' || lpad(to_hex(l % 2000 + 1), 12, '0'))::uuid""",
    # 200,000 events: UUIDv7 ids over five days from $1 (ms), 10 per link, all three types
    """INSERT INTO events (event_id, type, workspace_id, link_id, dialect, received_at, visitor_id)
       SELECT (lpad(to_hex($1::bigint + i * 2160), 12, '0') || '7' || substr(md5(i::text), 1, 3) || '8'
               || substr(md5(i::text), 4, 15))::uuid,
              (i % 3 + 1)::smallint, l.workspace_id, l.id, 'native',
              to_timestamp(($1::bigint + i * 2160) / 1000.0), 'v' || i
       FROM generate_series(0, 199999) i
       JOIN links l ON l.id = ('00000000-0000-4000-b000-' || lpad(to_hex(i % 20000 + 1), 12, '0'))::uuid""",
    """INSERT INTO customers (workspace_id, visitor_id, external_id, first_seen_at, last_seen_at)
       SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(c % 20 + 1), 12, '0'))::uuid, 'v' || c, 'c' || c, now(), now()
       FROM generate_series(1, 50000) c""",
    """INSERT INTO daily_stats (link_id, day, workspace_id, program_id, affiliate_id, clicks)
       SELECT l.id, current_date - d, l.workspace_id, l.program_id, l.affiliate_id, 1
       FROM links l CROSS JOIN generate_series(0, 2) d WHERE l.code LIKE 'L%'""",
    # the drops and flags of each link on two days, by two reasons
    """INSERT INTO drop_stats (workspace_id, link_id, day, reason, source, n)
       SELECT l.workspace_id, l.id, current_date - d, r, 'worker', 1
       FROM links l CROSS JOIN generate_series(0, 1) d CROSS JOIN unnest('{bot,duplicate}'::text[]) r""",
    # 40,000 sales: two per link, one of them unattributed
    """INSERT INTO sales (event_id, workspace_id, customer_external_id, amount, currency, event_name,
                          payment_processor, link_id, affiliate_id, program_id, unattributed, dialect, received_at)
       SELECT gen_random_uuid(), l.workspace_id, 'c' || (i % 50000), 100, 'usd', 'Purchase', 'stripe',
              CASE WHEN i % 2 = 0 THEN l.id END, CASE WHEN i % 2 = 0 THEN l.affiliate_id END,
              CASE WHEN i % 2 = 0 THEN l.program_id END, CASE WHEN i % 2 = 1 THEN 'no_lead' END, 'native', now()
       FROM generate_series(0, 39999) i
       JOIN links l ON l.id = ('00000000-0000-4000-b000-' || lpad(to_hex(i % 20000 + 1), 12, '0'))::uuid""",
    # 40,000 commissions, and a payout per affiliate
    """INSERT INTO commissions (workspace_id, program_id, affiliate_id, link_id, kind, source_id, amount, currency,
                                status, earned_at, approve_after)
       SELECT l.workspace_id, l.program_id, l.affiliate_id, l.id, 'sale', gen_random_uuid(), 10, 'usd',
              (ARRAY['pending', 'approved', 'paid'])[i % 3 + 1], now() - make_interval(days => i % 60), now()
       FROM generate_series(0, 39999) i
       JOIN links l ON l.id = ('00000000-0000-4000-b000-' || lpad(to_hex(i % 20000 + 1), 12, '0'))::uuid""",
    """INSERT INTO payouts (workspace_id, affiliate_id, currency, amount, commissions)
       SELECT workspace_id, id, 'usd', 100, 1 FROM affiliates""",
    # a sale per link on two days, in two currencies
    """INSERT INTO sale_stats (workspace_id, link_id, day, currency, sales, amount)
       SELECT l.workspace_id, l.id, current_date - d, c, 1, 4900
       FROM links l CROSS JOIN generate_series(0, 1) d CROSS JOIN unnest('{usd,eur}'::text[]) c""",
    "ANALYZE workspaces, programs, affiliates, links, events, customers, daily_stats, drop_stats, sale_stats, sales,"
    " commissions, payouts",
]


def _nodes(plan: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(plan["Node Type"], plan.get("Relation Name", ""))]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """The rows the scans of ``table``'s partitions returned, as EXPLAIN ANALYZE counted them."""
    own = (
        plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1)
        if plan.get("Relation Name", "").startswith(table)
        else 0
    )
    return own + sum(_rows_read(child, table) for child in plan.get("Plans", []))


def _rows_examined(plan: dict[str, Any], table: str) -> int:
    """The rows the scans of ``table``'s partitions looked at: returned, and removed by a
    filter or by a bitmap's recheck (a BRIN hands back whole page ranges)."""
    own = 0
    if plan.get("Relation Name", "").startswith(table):
        looked = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        own = (looked + plan.get("Rows Removed by Index Recheck", 0)) * plan.get("Actual Loops", 1)
    return own + sum(_rows_examined(child, table) for child in plan.get("Plans", []))


def _indexes(plan: dict[str, Any]) -> list[str]:
    out = [plan["Index Name"]] if "Index Name" in plan else []
    for child in plan.get("Plans", []):
        out += _indexes(child)
    return out


async def plan(conn: asyncpg.Connection, sql: str, *args: Any) -> list[tuple[str, str]]:
    # a generic plan, as a prepared statement gets after a few runs, and the custom one
    found = []
    for mode in ("force_generic_plan", "force_custom_plan"):
        await conn.execute(f"SET plan_cache_mode = {mode}")
        raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        found += _nodes((orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"])
    return found


def uses_an_index(nodes: list[tuple[str, str]], tables: set[str]) -> bool:
    """Every scan of a table (or partition) holding rows is an index scan; an empty
    partition (days ahead, the default) is rightly read by a sequential scan of nothing."""
    scans = [n for n, rel in nodes if rel in tables]
    index = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}
    return bool(scans) and all(n in index for n in scans)


@pytest.mark.timeout(60)
async def test_every_management_read_uses_an_index(pg: asyncpg.Pool):
    await maintain(pg, retention_days=30, dedupe_days=60, today=DAY)
    start_ms = int((DAY - date(1970, 1, 1)).days * 86_400_000) - 86_400_000  # from the day before
    async with pg.acquire() as conn:
        for statement in _FILL:
            await (conn.execute(statement, start_ms) if "$1" in statement else conn.execute(statement))
        assert await conn.fetchval("SELECT count(*) FROM events") == 200_000
        assert await conn.fetchval("SELECT count(*) FROM events_default") == 0
        ws, link, affiliate = await conn.fetchrow("SELECT workspace_id, id, affiliate_id FROM links WHERE code = 'L77'")
        links = [r["id"] for r in await conn.fetch(stats.AFFILIATE_LINKS_SQL, ws, affiliate)]
        today = await conn.fetchval("SELECT current_date")
        first = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC) + timedelta(days=2)  # a person's first event
        since = today - timedelta(days=29)
        reads: dict[str, list[tuple[Any, ...]]] = {
            "events": [
                (manage.events_query(link=False, type_=False), ws, 50),
                (manage.events_query(link=True, type_=False), ws, link, 50),
                (manage.events_query(link=False, type_=True), ws, 1, 50),
                (manage.events_query(link=False, type_=True, clicks=False), ws, 2, 50),
                (manage.events_query(link=True, type_=True, clicks=False), ws, link, 3, 50),
            ],
            "customers": [(manage.CUSTOMER, ws, "c77")],
            # an erasure's look for the person's events, and the sweep's re-check of one workspace
            "events_erasure": [
                (pg_erasure._EVENTS, ws, "c77", ["v77", "v20077"], [uuid.uuid4()], pg_erasure.uuid_floor(first)),
                (erasure_late._RAW, ws, pg_erasure.uuid_floor(first), 5000),
            ],
            "links": [
                (manage.LINK_BY_ID, link, ws),
                (manage.AFFILIATE_LINKS, ws, affiliate, 50),
                (stats.LINK_OWNED_SQL, link, ws),
                (stats.AFFILIATE_LINKS_SQL, ws, affiliate),
            ],
            "daily_stats": [(stats.COUNTED_SQL, links, since, today)],
            "drop_stats": [(stats.DROPPED_SQL, links, since, today)],
            "sale_stats": [(stats.SOLD_SQL, links, since, today), (stats.WORKSPACE_SQL[1], ws, since, today)],
        }
        reads["daily_stats"].append((stats.WORKSPACE_SQL[0], ws, since, today))
        # the console's stored-per-second sample: after its summarizing, a few rows read,
        # not the 200,000 a BRIN that has not summarized them would hand back
        await ring.Sampler(None, pg, None, [])._summarize(conn)  # type: ignore[arg-type]  # Postgres only
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + ring._STORED, 3.0, 1.0)
        examined = _rows_examined((orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"], "events")
        assert examined <= 5_000, examined
        # the console's live tail, each shape of its filter (refstream/console/tail.py): by an
        # index, and reading no more than its bound of the 200,000 rows it could match
        floor = pg_erasure.uuid_floor(datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC))
        for flt in (
            tail.Filter(),
            tail.Filter(workspace=str(ws)),
            tail.Filter(link="L77", dialect="native"),
            tail.Filter(workspace=str(ws), link="L77", type=2),
            tail.Filter(dialect="native", type=1),
            tail.Filter(dialect="none of them"),
        ):
            sql, args = tail._stored(flt, floor, link if flt.link else None)
            reads["events"].append((sql, *args))
            raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
            read = _rows_read((orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"], "events")
            assert 0 < read <= tail.SCAN_ROWS + tail.SHOWN, (flt, read)
        reads["commissions"] = [
            (stats.EARNED_SQL, links, since, today),
            (stats.WORKSPACE_SQL[3], ws, since, today),
            (ledger.page_query("commissions", (), affiliate=False, after=False), ws, 50),
            (ledger.page_query("commissions", ("status",), affiliate=True, after=True), ws, affiliate, "paid", 9, 50),
        ]
        reads["payouts"] = [
            (ledger.page_query("payouts", (), affiliate=True, after=False), ws, affiliate, 50),
            (ledger.page_query("payouts", ("currency",), affiliate=False, after=True), ws, "usd", 9, 50),
        ]
        reads["sales"] = [
            (manage.sales_query((), before=False), ws, 50),
            (manage.sales_query((), before=True), ws, link, 50),
            (manage.sales_query(("link_id",), before=False), ws, link, 50),
            (manage.sales_query(("affiliate_id",), before=True), ws, affiliate, link, 50),
            (manage.sales_query(("customer_id",), before=False), ws, "c77", 50),
        ]
        reads["drop_stats"].append((stats.WORKSPACE_SQL[2], ws, since, today))
        holding = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND reltuples >= 1000"
                " AND relnamespace = 'public'::regnamespace"
            )
        }
        tables = {"links", "customers", "daily_stats", "drop_stats", "sale_stats", "sales", "commissions", "payouts"}
        assert {f"events_p2033010{d}" for d in range(4, 9)} | tables <= holding
        for table, queries in reads.items():
            table = table.removesuffix("_erasure")
            for sql, *args in queries:
                nodes = await plan(conn, sql, *args)
                assert uses_an_index(nodes, {t for t in holding if t.startswith(table)}), f"{table}: {sql}\n{nodes}"
        # the erasure's look goes by the person's visitor (and customer, and click), the re-check
        # by the workspace's event ids: index names, not just index scans
        wanted = (
            ("_pkey", "_visitor_id_event_id_idx", "_customer_external_id_event_id_idx", "_click_id_event_id_idx"),
            ("_workspace_id_event_id_idx",),
        )
        for (sql, *args), names in zip(reads["events_erasure"], wanted, strict=True):
            for mode in ("force_generic_plan", "force_custom_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
                used = set(_indexes((orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"]))
                assert used and all(u.endswith(names) for u in used), (sql, mode, used)
        # a lead or conversion by the partial index of them, never by a scan of every click
        for mode in ("force_generic_plan", "force_custom_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            raw = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + manage.events_query(link=False, type_=True, clicks=False), ws, 2, 50
            )
            used = set(_indexes((orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"]))
            assert used and all(u.endswith("_workspace_id_type_event_id_idx") for u in used), (mode, used)
        # a link's by its received time (schema 19; by the link's key since schema 26:
        # events_link_key_received, no index of its own); a busy link's (30,000 more clicks)
        # each partition's scan in order, merged, stopped at the limit: no sort of the link's
        # events, only of a tie's ids
        hot_ws, hot = await conn.fetchrow("SELECT workspace_id, id FROM links WHERE code = 'L78'")
        await conn.execute(
            """INSERT INTO events (event_id, type, workspace_id, link_id, dialect, received_at)
               SELECT (lpad(to_hex($1::bigint + i * 14), 12, '0') || '7' || substr(md5(i::text), 1, 3) || '9'
                       || substr(md5(i::text), 4, 15))::uuid,
                      1, $2, $3, 'native', to_timestamp(($1::bigint + i * 14) / 1000.0)
               FROM generate_series(0, 29999) i""",
            start_ms,
            hot_ws,
            hot,
        )
        await conn.execute("ANALYZE events")
        for one, shape in ((link, None), (hot, "Incremental Sort")):
            for type_ in (False, True):
                for mode in ("force_generic_plan", "force_custom_plan"):
                    await conn.execute(f"SET plan_cache_mode = {mode}")
                    sql = manage.events_query(link=True, type_=type_)
                    given = [hot_ws if one == hot else ws, one, *([1] if type_ else []), 50]
                    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *given)
                    tree = (orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"]
                    used = set(_indexes(tree))
                    assert used and all(u.endswith("_uuid_hash_extended_received_at_idx") for u in used), (
                        type_,
                        mode,
                        used,
                    )
                    kinds = [n for n, _ in _nodes(tree)]
                    assert shape is None or ("Sort" not in kinds and shape in kinds), (type_, mode, kinds)
        # and the answer is the newest first, across partitions
        rows = await manage.list_events(conn, str(ws), link_id=None, type_=None, limit=5)
        newest = await conn.fetch("SELECT event_id FROM events WHERE workspace_id = $1 ORDER BY 1 DESC LIMIT 5", ws)
        assert [r["event_id"] for r in rows] == [str(r["event_id"]) for r in newest]
        for owner, one in ((ws, link), (hot_ws, hot)):
            rows = await manage.list_events(conn, str(owner), link_id=str(one), type_=None, limit=5)
            newest = await conn.fetch(
                "SELECT event_id FROM events WHERE link_id = $1 ORDER BY received_at DESC, event_id DESC LIMIT 5", one
            )
            assert len(rows) == 5 and [r["event_id"] for r in rows] == [str(r["event_id"]) for r in newest]


@pytest.mark.timeout(60)
async def test_the_recounts_and_an_erasures_look_read_a_chunk_of_links_by_their_keys(pg: asyncpg.Pool):
    """reconcile's recount, the drops' and an erasure's look for shared visitor keys read a
    chunk of links' events by ``events_link_key_received`` (schema 26), never by a scan of
    the window's events; the primary key only where a flag names its event."""
    from ingest.privacy import erasure_rows
    from workers.consumer import drops
    from workers.ops import reconcile

    await maintain(pg, retention_days=30, dedupe_days=60, today=DAY)
    start_ms = int((DAY - date(1970, 1, 1)).days * 86_400_000) - 86_400_000
    async with pg.acquire() as conn:
        for statement in _FILL:
            await (conn.execute(statement, start_ms) if "$1" in statement else conn.execute(statement))
        links = [r["id"] for r in await conn.fetch("SELECT id FROM links ORDER BY id LIMIT 100")]
        held = {r[0] for r in await conn.fetch("SELECT DISTINCT tableoid::regclass::text FROM events")}
        since = datetime.fromtimestamp(start_ms / 1000, UTC)
        window = (links, since, since + timedelta(days=3), uuid.UUID(int=0))
        statements: list[tuple[Any, ...]] = [
            (reconcile._DAYS, *window),
            (reconcile._VISITS, *window),
            (drops._TRUTH, *window),
            (erasure_rows._SHARED_KEYS, links, ["v1", "v2"], [uuid.uuid4()]),
        ]
        for sql, *args in statements:
            select: str = sql[sql.index("SELECT") :]  # a CREATE TEMP TABLE ... AS: its query
            for mode in ("force_generic_plan", "force_custom_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + select, *args)
                tree = (orjson.loads(raw) if isinstance(raw, str | bytes) else raw)[0]["Plan"]
                on_events = [i for i in _indexes(tree) if i.startswith("events_p")]
                by_key = [i for i in on_events if i.endswith("_uuid_hash_extended_received_at_idx")]
                assert by_key and all(i in by_key or i.endswith("_pkey") for i in on_events), (sql[:60], mode)
                assert uses_an_index(_nodes(tree), held), (sql[:60], mode, _nodes(tree))
