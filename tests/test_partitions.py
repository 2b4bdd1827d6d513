"""Daily partitions of events and link_visitor_days: made ahead, rows routed into them (those
that landed in the default partition moved), dropped after the retention with the daily
stats kept; dedupe keys outlive their events' partitions and are purged on their own
retention; an event older than the horizon is stored and counts nothing."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from workers.consumer.partitions import day_uuid, maintain
from workers.consumer.store import write_batch
from workers.ops.reconcile import reconcile

from ._procs import Procs
from ._world import make_world
from .conftest import wait_for


def ms(day: date, hour: int = 12) -> int:
    return int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)


def click(code: str, visitor: str, at_ms: int) -> Envelope:
    payload = {"code": code, "visitor_id": visitor}
    return Envelope(EventType.CLICK, Dialect.AFFITOR, payload, event_id=uuid7(at_ms), received_at_ms=at_ms)


def lead(code: str, customer: str, at_ms: int) -> Envelope:
    payload = {"code": code, "visitor_id": customer, "external_id": customer, "name": "Sign Up"}
    return Envelope(EventType.LEAD, Dialect.REFPORT, payload, event_id=uuid7(at_ms), received_at_ms=at_ms)


async def partitions(pg: asyncpg.Pool, table: str) -> dict[str, str]:
    rows = await pg.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table,
    )
    return {r["relname"]: r["bound"] for r in rows}


async def where(pg: asyncpg.Pool, event_id: Any) -> str:
    return str(await pg.fetchval("SELECT tableoid::regclass::text FROM events WHERE event_id = $1", event_id))


async def test_partitions_are_made_ahead_and_take_what_the_default_held(pg: asyncpg.Pool, redis: Any, keys: Keys):
    await make_world(pg, redis, keys, code="A")
    today = date(2030, 1, 10)
    early = click("A", "v1", ms(today))
    await write_batch(pg, [early])  # no partition for that day yet: the default one takes it
    assert await where(pg, early.event_id) == "events_default"

    done = await maintain(pg, retention_days=30, dedupe_days=60, today=today)
    days = [today + timedelta(days=d) for d in range(-1, 8)]
    assert sorted(done.created) == sorted(
        [f"events_p{d:%Y%m%d}" for d in days] + [f"link_visitor_days_p{d:%Y%m%d}" for d in days]
    )
    assert await where(pg, early.event_id) == "events_p20300110"  # moved out of the default partition
    bounds = await partitions(pg, "events")
    assert bounds["events_p20300110"] == f"FOR VALUES FROM ('{day_uuid(today)}') TO ('{day_uuid(days[2])}')"
    assert str(day_uuid(today)) == "01b9091e-f000-7000-8000-000000000000"  # 2030-01-10T00:00Z in ms
    assert (
        await pg.fetchval("SELECT tableoid::regclass::text FROM link_visitor_days WHERE visitor_key = 'v1'")
        == "link_visitor_days_p20300110"
    )

    later = click("A", "v2", ms(today + timedelta(days=3)))
    await write_batch(pg, [later])
    assert await where(pg, later.event_id) == "events_p20300113"
    again = await maintain(pg, retention_days=30, dedupe_days=60, today=today)
    assert (again.created, again.dropped) == ([], [])
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 2


async def test_retention_drops_events_keeps_history_and_dedupe(pg: asyncpg.Pool, redis: Any, keys: Keys):
    await make_world(pg, redis, keys, code="A")
    first = date(2031, 3, 1)
    await maintain(pg, retention_days=30, dedupe_days=60, today=first)
    old_click, old_lead = click("A", "v1", ms(first)), lead("A", "c1", ms(first, 13))
    await write_batch(pg, [old_click, old_lead])

    later = first + timedelta(days=40)  # the retention's first day is now 2031-03-11
    done = await maintain(pg, retention_days=30, dedupe_days=60, today=later)
    assert done.purged_dedupe == 0
    assert "events_p20310301" in done.dropped and "link_visitor_days_p20310301" in done.dropped
    assert not any(name.startswith("events_p2031030") for name in await partitions(pg, "events"))
    assert await pg.fetchval("SELECT count(*) FROM events") == 0
    horizon = await pg.fetchrow("SELECT horizon, horizon_id FROM event_retention")
    assert horizon["horizon_id"] == day_uuid(date(2031, 3, 11))
    history = "SELECT clicks, unique_clicks, leads FROM daily_stats WHERE day = '2031-03-01'"
    assert tuple(await pg.fetchrow(history)) == (1, 1, 1)  # the daily stats are the history

    # the lead's dedupe key outlived its partition: the same lead again is a no-op
    repeat = await write_batch(pg, [lead("A", "c1", ms(later))])
    assert (repeat.inserted, repeat.duplicates) == (0, 1)
    # an event below the horizon (a replay from an archive, say) is stored and counts nothing
    replayed = await write_batch(pg, [old_click])
    assert (replayed.inserted, replayed.expired) == (1, 1)
    assert tuple(await pg.fetchrow("SELECT clicks, unique_clicks, leads FROM links WHERE code = 'A'")) == (1, 1, 1)
    # reconcile recounts the retained window only: the purged day's counts stand
    assert await reconcile(pg, fix=False) == []
    assert await reconcile(pg, fix=True) == []
    assert tuple(await pg.fetchrow(history)) == (1, 1, 1)

    purged = await maintain(pg, retention_days=30, dedupe_days=35, today=later)
    assert purged.purged_default == 1  # the expired copy, from the default partition
    assert purged.purged_dedupe == 1  # the lead's key, 40 days old > 35
    assert await pg.fetchval("SELECT count(*) FROM event_dedupe") == 0
    assert await pg.fetchval("SELECT count(*) FROM events") == 0


async def test_a_running_worker_makes_the_days_partitions(procs: Procs, pg: asyncpg.Pool):
    today = datetime.now(UTC).date()
    days = [today + timedelta(days=d) for d in range(-1, 8)]
    names = [f"{t}_p{d:%Y%m%d}" for t in ("events", "link_visitor_days") for d in days]
    for name in names:  # made by another test's worker, maybe: gone, so this one's must make them
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
    procs.start("work")  # with the test settings' retention of 36,500 days: back before 1970

    async def made() -> bool:
        found = await pg.fetch("SELECT relname FROM pg_class WHERE relname = ANY($1::text[])", names)
        return len(found) == len(names)

    await wait_for(made, timeout=60, what="the worker's partition maintenance")
    assert "housekeeping.failed" not in procs.logs()
