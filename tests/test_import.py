"""Historical import (docs/import.md) against a real Redis and Postgres: ``refstream import``
run as a user runs it, twice, over clicks, leads, a sale and refunds of days ago with bad
rows among them; each row is stored once with its own time, the second run stores
nothing, every refusal is counted by its reason, and no webhook, fraud flag or commission
comes of it unless asked. The lane gives way while live entries wait; an erased person's
rows are stored scrubbed and a listed one's refused; CSV and Dub's export read alike."""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import clicks
from ingest.contract import erasure as ledger
from ingest.contract.keys import GROUP, Keys
from ingest.contract.settings import Settings
from ingest.ledger.outbox import EVENT_TYPES
from ingest.manage import suppressions
from ingest.privacy import erasure as pg_erasure
from workers.ops import import_formats, import_lines, imports
from workers.ops.import_lane import HALVE_AFTER_S
from workers.ops.reconcile import reconcile

from ._procs import env_for, run_command
from ._world import World
from .conftest import SECRET_KEY, wait_for


def _at(days_ago: float, minutes: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago) + timedelta(minutes=minutes)).isoformat()


def history(code: str) -> list[dict[str, Any]]:
    """Three clicks, two leads naming two of them, a sale and two refunds of it, days ago."""
    return [
        {
            "type": "click",
            "id": "c1",
            "timestamp": _at(5),
            "link": code,
            "ip": "203.0.113.7",
            "visitor_id": "v-1",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",
            "referrer": "https://blog.example/post",
        },
        {"type": "click", "id": "c2", "timestamp": _at(4), "link": code, "ip": "203.0.113.8"},
        {"type": "click", "id": "c3", "timestamp": _at(3), "link": code},
        {
            "type": "lead",
            "id": "l1",
            "timestamp": _at(5, 10),
            "click": "c1",
            "customer_id": "cust-1",
            "email": "one@example.com",
            "customer_name": "One",
        },
        {"type": "lead", "id": "l2", "timestamp": _at(4, 10), "click": "c2", "customer_id": "cust-2"},
        {
            "type": "sale",
            "id": "s1",
            "timestamp": _at(2),
            "customer_id": "cust-1",
            "amount": 4900,
            "invoice_id": "inv-1",
            "payment_processor": "stripe",
        },
        {"type": "refund", "id": "r1", "timestamp": _at(1), "invoice_id": "inv-1", "amount": 900},
        {"type": "refund", "id": "r2", "timestamp": _at(1, 5), "invoice_id": "inv-1", "amount": 9000},
    ]


def bad_rows(code: str) -> list[str]:
    """One row per refusal the import makes before Postgres (and one it makes after)."""
    rows = [
        {"type": "click", "id": "x1", "timestamp": _at(45), "link": code},  # past_retention (30 days)
        {"type": "click", "id": "x2", "timestamp": _at(-2), "link": code},  # future
        {"type": "click", "id": "x3", "timestamp": _at(2), "link": "no-such-link"},  # unknown_link
        {"type": "lead", "id": "x4", "timestamp": _at(2), "click": "c-elsewhere", "customer_id": "c"},  # unknown_click
        {"type": "lead", "id": "x5", "timestamp": _at(2), "customer_id": "c"},  # no_link
        {"type": "sale", "id": "x6", "timestamp": _at(2), "customer_id": "c", "amount": 49.99},  # invalid
        {"type": "refund", "id": "x7", "timestamp": _at(1), "invoice_id": "inv-none"},  # sale_not_found
    ]
    return [orjson.dumps(r).decode() for r in rows] + ["{not json", '{"type": "purchase", "id": "x9"}']


PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass
"""


async def import_cli(
    settings: Settings, path: Path | str, world: World, *args: str, exit_code: int = 0, **env: str
) -> dict[str, Any]:
    code, out, err = await run_command(
        "import",
        str(path),
        "--workspace",
        world.workspace_id,
        "--json",
        *args,
        env=env_for(settings, **env),
        within_s=120,
    )
    assert code == exit_code, err
    summary: dict[str, Any] = orjson.loads(out)
    return summary


async def counters(pg: asyncpg.Pool) -> list[tuple[Any, ...]]:
    links = [tuple(r) for r in await pg.fetch("SELECT id, clicks, unique_clicks, leads FROM links ORDER BY id")]
    sales = [tuple(r) for r in await pg.fetch("SELECT * FROM sale_stats ORDER BY 1, 2, 3, 4")]
    return links + sales


async def test_an_import_run_twice_stores_each_row_once_and_counts_every_refusal(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    from .test_webhooks import make_webhook

    await make_webhook(pg, world.workspace_id, "http://127.0.0.1:9/hook", SECRET_KEY, events=list(EVENT_TYPES))
    await pg.execute('UPDATE programs SET commission = \'{"sale_bps": 1000, "lead_flat": 300}\'')
    path = tmp_path / "history.ndjson"
    good = history(world.link["code"])
    path.write_text("\n".join([*(orjson.dumps(r).decode() for r in good), *bad_rows(world.link["code"])]) + "\n")

    first = await import_cli(settings, path, world, exit_code=3, REFSTREAM_EVENT_RETENTION_DAYS="30")
    assert first["read"] == len(good) + 9
    assert first["stored"] == 7, first  # 3 clicks, 2 leads, the sale, the first refund
    assert first["refused"] == {
        "future": 1,
        "invalid": 3,
        "no_link": 1,
        "past_retention": 1,
        "refund_exceeds_sale": 1,
        "sale_not_found": 1,
        "unknown_click": 1,
        "unknown_link": 1,
    }, first
    assert first["read"] == first["stored"] + first["duplicates"] + first["refused_total"]
    assert any("line 11" in shown for shown in first["examples"]["unknown_link"])
    niced = first["backend_nice"]  # each backend it opened: reniced, or why not
    assert niced["niceness"] == 10 and niced["of"] >= 1 and 0 <= niced["lowered"] <= niced["of"], niced
    assert niced["lowered"] == niced["of"] or niced["why_not"], niced

    # each row at its own time, in its own day's partition, through the link and the click
    rows = await pg.fetch(
        "SELECT type, received_at, click_id, visitor_id, dialect, host(ip) AS ip FROM events ORDER BY received_at"
    )
    assert [r["type"] for r in rows] == [1, 2, 1, 2, 1] and {r["dialect"] for r in rows} == {"import"}
    stamp = datetime.fromisoformat(good[0]["timestamp"])
    assert abs((rows[0]["received_at"] - stamp).total_seconds()) < 0.002 and rows[0]["ip"] == "203.0.113.7"
    assert rows[1]["click_id"] is not None and rows[1]["visitor_id"] == "v-1"
    parts = {r["relname"] for r in await pg.fetch(PARTITIONS)}
    assert f"events_p{stamp:%Y%m%d}" in parts
    default_rows = await pg.fetchval("SELECT count(*) FROM events_default")
    assert default_rows == 0
    link = await pg.fetchrow("SELECT clicks, unique_clicks, leads FROM links WHERE id = $1", world.link["id"])
    assert tuple(link) == (3, 3, 2)
    sale = await pg.fetchrow("SELECT link_id, refunded, received_at FROM sales WHERE invoice_id = 'inv-1'")
    assert str(sale["link_id"]) == world.link["id"] and sale["refunded"] == 900  # attributed through cust-1's lead
    # history: no webhook, no commission, no fraud flag
    assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    assert await pg.fetchval("SELECT count(*) FROM commissions") == 0
    assert await pg.fetchval("SELECT count(*) FROM event_flags") == 0
    before = await counters(pg)
    assert not await reconcile(pg, fix=False)

    again = await import_cli(settings, path, world, exit_code=3, REFSTREAM_EVENT_RETENTION_DAYS="30")
    assert again["stored"] == 0 and again["duplicates"] == 7, again
    assert again["refused"] == first["refused"]
    assert await pg.fetchval("SELECT count(*) FROM events") == 5
    assert await pg.fetchval("SELECT count(*) FROM refunds") == 1
    assert await counters(pg) == before


async def test_commissions_and_webhooks_follow_their_flags(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    from .test_webhooks import make_webhook

    await make_webhook(pg, world.workspace_id, "http://127.0.0.1:9/hook", SECRET_KEY, events=list(EVENT_TYPES))
    await pg.execute('UPDATE programs SET commission = \'{"sale_bps": 1000, "lead_flat": 300}\'')
    rows = [import_formats.row(n, r) for n, r in enumerate(history(world.link["code"]), 1)]
    opts = imports.Options(world.workspace_id, "test", commissions=True, webhooks=True, share=1.0)
    done = await imports.Importer(pg, opts, imports.LiveBacklog(redis, keys, 4)).run(rows)
    assert done.stored == 7
    earned = sorted((r["kind"], r["amount"]) for r in await pg.fetch("SELECT kind, amount FROM commissions"))
    assert earned == [("clawback", -90), ("lead", 300), ("lead", 300), ("sale", 490)]
    kinds = {r["event_type"] for r in await pg.fetch("SELECT event_type FROM webhook_deliveries")}
    assert {"sale.created", "commission.created", "refund.created"} <= kinds


async def test_an_imported_refund_claws_back_a_live_sales_commission_without_the_flag(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
) -> None:
    """A live sale earns 1,000 of 10,000; its full refund, imported without --commissions,
    takes the 1,000 back (on main it stood): a clawback follows the sale's commission,
    never an import's flags (docs/import.md, *Side effects*)."""
    from .test_commissions import rules
    from .test_sales import sale_body, track_sale
    from .test_seed_004_refport import lead, lead_body, new_click

    assert (await rules(edge, world, sale_bps=1000))[0] == 200
    assert (await lead(edge, world.api_key, lead_body(await new_click(edge))))[0] == 200
    await drain()
    assert (await track_sale(edge, world.api_key, sale_body(invoiceId="inv-live", amount=10_000)))[0] == 200
    await drain()
    assert await pg.fetchval("SELECT sum(amount) FROM commissions") == 1000
    refund = {"type": "refund", "id": "r-live", "timestamp": _at(0, -1), "invoice_id": "inv-live"}
    opts = imports.Options(world.workspace_id, "test", share=1.0)  # no --commissions, no --webhooks
    done = await imports.Importer(pg, opts, imports.LiveBacklog(redis, keys, 4)).run([import_formats.row(1, refund)])
    assert done.stored == 1
    earned = sorted((r["kind"], r["amount"]) for r in await pg.fetch("SELECT kind, amount FROM commissions"))
    assert earned == [("clawback", -1000), ("sale", 1000)]
    assert await pg.fetchval("SELECT count(*) FROM webhook_deliveries WHERE event_type = 'refund.created'") == 0


async def test_a_live_sale_an_imported_lead_attributes_earns(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain
) -> None:
    """A live sale with no lead yet; an import (no --commissions) brings the customer's click
    and lead of yesterday: the sale is attributed, and earns (on main it never could). The
    imported lead itself earns nothing: it is history, paid for where it came from."""
    from .test_commissions import rules
    from .test_sales import sale_body, track_sale

    assert (await rules(edge, world, sale_bps=1000, lead_flat=300))[0] == 200
    body = sale_body(invoiceId="inv-live", customerExternalId="cust-9", amount=10_000)
    assert (await track_sale(edge, world.api_key, body))[0] == 200
    await drain()
    assert await pg.fetchval("SELECT unattributed FROM sales") == "no_lead"
    rows = [
        {"type": "click", "id": "c9", "timestamp": _at(1), "link": world.link["code"]},
        {"type": "lead", "id": "l9", "timestamp": _at(1, 10), "click": "c9", "customer_id": "cust-9"},
    ]
    opts = imports.Options(world.workspace_id, "test", share=1.0)
    done = await imports.Importer(pg, opts, imports.LiveBacklog(redis, keys, 4)).run(
        [import_formats.row(n, r) for n, r in enumerate(rows, 1)]
    )
    assert done.stored == 2
    assert await pg.fetchval("SELECT unattributed FROM sales") is None
    earned = [tuple(r) for r in await pg.fetch("SELECT kind, amount FROM commissions")]
    assert earned == [("sale", 1000)]


class Polled(imports.LiveBacklog):
    """The live backlog, counting how often the import asked."""

    polls = 0

    async def waiting(self) -> imports.Waiting:
        self.polls += 1
        return await super().waiting()


async def test_the_import_waits_while_live_entries_wait(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """Entries in a live partition that the workers have not acknowledged hold the import
    back; once they are acknowledged it goes on."""
    stream = keys.stream(0)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(30):
        await redis.xadd(stream, {"i": str(i)})
    backlog = Polled(redis, keys, 4)
    assert await backlog.entries() == 30
    rows = [import_formats.row(n, r) for n, r in enumerate(history(world.link["code"])[:3], 1)]
    opts = imports.Options(world.workspace_id, "test", yield_backlog=10, yield_lag_ms=0, share=1.0)
    read = await redis.xreadgroup(GROUP, "w1", {stream: ">"}, count=15)  # half read, none acknowledged
    assert await backlog.entries() == 30  # read but pending counts as waiting
    polls = backlog.polls
    task = asyncio.create_task(imports.Importer(pg, opts, backlog).run(rows))
    await wait_for(lambda: asyncio.sleep(0, result=backlog.polls >= polls + 3), what="the import to poll thrice")
    assert not task.done() and await pg.fetchval("SELECT count(*) FROM events") == 0
    await redis.xack(stream, GROUP, *[i for i, _ in read[0][1]])
    rest = await redis.xreadgroup(GROUP, "w1", {stream: ">"})
    await redis.xack(stream, GROUP, *[i for i, _ in rest[0][1]])
    done = await asyncio.wait_for(task, 30)
    assert done.stored == 3 and done.waited_s > 0


async def test_one_live_entry_waiting_longer_than_the_lag_bound_holds_the_import_back(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """Fewer waiting entries than ``yield_backlog`` still hold the import back when the oldest
    has waited longer than ``yield_lag_ms`` (by Redis's clock), unread or read and pending;
    the share is halved after a batch that had to wait ``HALVE_AFTER_S`` (the entry keeps
    ageing: no floor is measured)."""
    stream = keys.stream(1)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    secs, _ = await redis.time()
    old = f"{(int(secs) - 5) * 1000}-0"  # an entry five seconds old by Redis's clock
    await redis.xadd(stream, {"i": "old"}, id=old)
    backlog = Polled(redis, keys, 4)
    waiting = await backlog.waiting()
    assert waiting.entries == 1 and 4_000 < waiting.oldest_ms < 60_000, waiting
    await redis.xreadgroup(GROUP, "w1", {stream: ">"})  # read, not acknowledged: still waiting
    assert (await backlog.waiting()).oldest_ms > 4_000
    rows = [import_formats.row(n, r) for n, r in enumerate(history(world.link["code"])[:3], 1)]
    opts = imports.Options(world.workspace_id, "test", batch_size=1, yield_backlog=1000, yield_lag_ms=200, share=0.8)
    importer = imports.Importer(pg, opts, backlog)
    task = asyncio.create_task(importer.run(rows))
    held = time.monotonic()
    await wait_for(
        lambda: asyncio.sleep(0, result=backlog.polls >= 3 and time.monotonic() - held > HALVE_AFTER_S),
        what="the import to wait past the halving bound",
    )
    assert not task.done() and await pg.fetchval("SELECT count(*) FROM events") == 0
    await redis.xack(stream, GROUP, old)
    assert await backlog.waiting() == imports.Waiting(0, 0)
    done = await asyncio.wait_for(task, 30)
    assert (done.stored, done.behind) == (3, 1), done
    assert done.share_low == pytest.approx(0.4)  # halved once, then regained a step a batch


async def test_an_erased_persons_rows_are_imported_scrubbed_and_a_listed_ones_refused(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    token = secrets.token_hex(4)
    erased, listed = f"gone-{token}", f"listed-{token}"
    await pg_erasure.erase(pg, world.workspace_id, erased, by="test", archive_days=30)
    async with pg.acquire() as conn:
        await suppressions.add(conn, world.workspace_id, "customer", listed, by="test")
        await suppressions.add(conn, world.workspace_id, "visitor", f"v-{listed}", by="test")
    code = world.link["code"]
    raw = [
        {"type": "click", "id": "c1", "timestamp": _at(3), "link": code, "ip": "198.51.100.9"},
        {
            "type": "lead",
            "id": "l1",
            "timestamp": _at(3, 5),
            "click": "c1",
            "customer_id": erased,
            "email": f"{erased}@example.com",
            "customer_name": "Gone Person",
        },
        {"type": "lead", "id": "l2", "timestamp": _at(3, 6), "link": code, "customer_id": listed},
        {"type": "click", "id": "c2", "timestamp": _at(3), "link": code, "visitor_id": f"v-{listed}"},
        {"type": "lead", "id": "l3", "timestamp": _at(3, 7), "click": "c2", "customer_id": f"x-{token}"},
    ]
    rows = [import_formats.row(n, r) for n, r in enumerate(raw, 1)]
    done = await imports.Importer(
        pg, imports.Options(world.workspace_id, "test", share=1.0), imports.LiveBacklog(None, keys, 4)
    ).run(rows)
    # the listed visitor's click kept nowhere: a lead naming it names an unknown click
    assert (done.stored, dict(done.refused)) == (2, {"suppressed": 2, "unknown_click": 1}), done
    assert done.scrubbed >= 1
    lead = await pg.fetchrow("SELECT customer_external_id, ip, payload FROM events WHERE type = 2")
    assert ledger.is_pseudonym(lead["customer_external_id"]) and lead["ip"] is None
    dumped = orjson.dumps(dict(lead)).decode() if lead else ""
    assert erased not in dumped and "Gone Person" not in dumped


async def test_csv_and_dubs_export_read_as_the_native_rows(
    world: World, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    code = world.link["code"]
    csv_text = (
        "type,id,timestamp,link,click,customer_id,amount,invoice_id,metadata\n"
        f"click,c1,{_at(3)},{code},,,,,\n"
        f"lead,l1,{_at(3, 1)},,c1,cust-9,,,\n"
        f'sale,s1,{_at(2)},,,cust-9,1500,inv-9,"{{""plan"": ""pro""}}"\n'
        f"sale,s2,{_at(2)},,,cust-9,15.00,inv-10,\n"
    )
    parsed = list(import_formats.csv_rows(import_lines.Lines(io.BytesIO(csv_text.encode()))))
    assert [type(r).__name__ for r in parsed] == ["Row", "Row", "Row", "Bad"]
    sale = parsed[2]
    assert isinstance(sale, import_formats.Row) and sale.fields["metadata"] == {"plan": "pro"}
    assert isinstance(parsed[3], import_formats.Bad) and parsed[3].line == 5 and "amount" in parsed[3].detail

    dub = [
        {"event": "click", "timestamp": _at(3), "click": {"id": "dclk1", "ip": "192.0.2.1"}, "link": {"key": code}},
        {
            "event": "lead",
            "timestamp": _at(3, 2),
            "eventName": "Sign Up",
            "click": {"id": "dclk1"},
            "link": {"key": code},
            "customer": {"externalId": "dub-cust", "email": "d@example.com"},
        },
        {
            "event": "sale",
            "timestamp": _at(2),
            "eventName": "Purchase",
            "click": {"id": "dclk1"},
            "link": {"key": code},
            "customer": {"externalId": "dub-cust"},
            "sale": {"amount": 2500, "invoiceId": "dub-inv", "paymentProcessor": "stripe"},
        },
    ]
    path = tmp_path / "dub.ndjson"
    path.write_text("\n".join(orjson.dumps(e).decode() for e in dub) + "\n")
    out = await import_cli(settings, path, world, "--format", "dub")
    assert (out["stored"], out["refused_total"], out["source"]) == (3, 0, "dub"), out
    lead = await pg.fetchrow("SELECT click_id, customer_external_id FROM events WHERE type = 2")
    click = await pg.fetchval("SELECT event_id FROM events WHERE type = 1")
    assert lead["click_id"] == click and lead["customer_external_id"] == "dub-cust"
    assert clicks.parse(clicks.mint(click)) == click
    assert await pg.fetchval("SELECT link_id FROM sales WHERE invoice_id = 'dub-inv'") is not None


@pytest.mark.parametrize("text", ["", "\n\n"])
async def test_an_empty_file_reads_nothing(text: str, world: World, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "empty.ndjson"
    path.write_text(text)
    out = await import_cli(settings, path, world)
    assert (out["read"], out["stored"], out["refused_total"]) == (0, 0, 0)
