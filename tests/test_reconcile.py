"""`refstream reconcile`: counters recounted from the event rows of a window; drift reported
(exit 1) and repaired with --fix a chunk of links at a time, unique-click accounting
included; days outside the window (before the retention's horizon) are left as they are."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import orjson

from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from workers.consumer.store import write_batch
from workers.ops.reconcile import Drift, reconcile

from ._procs import REFSTREAM, env_for
from ._world import make_world
from .conftest import wait_for

DAY1 = int(datetime(2024, 3, 1, 10, tzinfo=UTC).timestamp()) * 1000
DAY2 = DAY1 + 86_400_000


async def run(settings: Settings, *args: str) -> tuple[int, Any, str]:
    """A `refstream` command as a process: (exit code, stdout as JSON or text, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM, *args, env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    text = out.decode()
    return proc.returncode, orjson.loads(out) if "--json" in args else text, err.decode()


def click(code: str, visitor: str, ms: int, *, test: bool = False) -> Envelope:
    payload: dict[str, Any] = {"code": code, "visitor_id": visitor} | ({"test_mode": True} if test else {})
    return Envelope(EventType.CLICK, Dialect.AFFITOR, payload, received_at_ms=ms)


async def history(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    await make_world(pg, redis, keys, code="A")
    await make_world(pg, redis, keys, code="B", name="Other")
    await write_batch(pg, [click("A", f"v{i % 3}", DAY1 + i) for i in range(6)] + [click("A", "v9", DAY2)])
    await write_batch(pg, [click("B", "w", DAY1), click("B", "w", DAY2 + 5), click("B", "x", DAY2, test=True)])
    lead = {"code": "A", "visitor_id": "v1", "external_id": "c1", "name": "Sign Up"}
    conversion = {"code": "A", "visitor_id": "v1", "dedupe": "A:s1"}
    await write_batch(
        pg,
        [
            Envelope(EventType.LEAD, Dialect.REFPORT, lead, received_at_ms=DAY1 + 100),
            Envelope(EventType.CONVERSION, Dialect.BRICQS, conversion, received_at_ms=DAY2 + 100),
        ],
    )


async def counters(pg: asyncpg.Pool) -> list[Any]:
    return [
        tuple(r)
        for r in await pg.fetch(
            "SELECT code, clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at"
            " FROM links ORDER BY code"
        )
    ] + [tuple(r) for r in await pg.fetch("SELECT * FROM daily_stats ORDER BY link_id, day")]


async def test_drift_made_by_hand_is_reported_then_fixed(settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys):
    await history(pg, redis, keys)
    good = await counters(pg)
    assert good[0][:6] == ("A", 7, 4, 0, 1, 1)  # v0, v1, v2 on day 1, v9 on day 2
    assert (await run(settings, "reconcile", "--json"))[:2] == (0, {"drift": [], "fixed": False})

    a = await pg.fetchval("SELECT id FROM links WHERE code = 'A'")
    await pg.execute("UPDATE links SET clicks = clicks + 5, last_clicked_at = NULL WHERE code = 'A'")
    await pg.execute("UPDATE daily_stats SET leads = 4 WHERE link_id = $1 AND day = '2024-03-01'", a)
    await pg.execute(
        "INSERT INTO daily_stats (link_id, day, workspace_id, clicks) SELECT id, '2024-02-01', workspace_id, 2"
        " FROM links WHERE code = 'B'"
    )
    # a lost first-click-of-the-day row: the next click of that visitor that day would count as unique again
    await pg.execute("DELETE FROM link_visitor_days WHERE link_id = $1 AND visitor_key = 'v9'", a)

    code, out, _ = await run(settings, "reconcile", "--json")
    assert code == 1 and out["fixed"] is False
    last_click = datetime.fromtimestamp((DAY2) / 1000, tz=UTC).isoformat()
    assert out["drift"] == [
        {"code": "A", "counter": "clicks", "stored": 12, "recomputed": 7},
        {"code": "A", "counter": "last_clicked_at", "stored": None, "recomputed": last_click},
        {"code": "A", "counter": "visitor_days", "stored": 3, "recomputed": 4},
        {"code": "A", "counter": "leads", "day": "2024-03-01", "stored": 4, "recomputed": 1},
        {"code": "B", "counter": "clicks", "day": "2024-02-01", "stored": 2, "recomputed": 0},
    ]
    code, text, _ = await run(settings, "reconcile")  # the table
    assert code == 1 and "last_clicked_at" in text and "2024-02-01" in text

    code, fixed, err = await run(settings, "reconcile", "--fix", "--json")
    assert (code, fixed, err) == (0, {"drift": out["drift"], "fixed": True}, "")  # the answer, no log line after it
    assert await counters(pg) == good
    assert await reconcile(pg, fix=False) == []
    code, text, err = await run(settings, "reconcile")
    assert code == 0 and text == "no drift: every counter equals its event rows\n" and err == ""

    # the rebuilt visitor set keeps later batches exact: v9 again on day 2 is not a new unique click
    await write_batch(pg, [click("A", "v9", DAY2 + 60_000)])
    assert await pg.fetchval("SELECT unique_clicks FROM links WHERE code = 'A'") == 4
    assert await reconcile(pg, fix=True) == []


async def test_a_fix_locks_one_chunk_of_links_at_a_time(pg: asyncpg.Pool, redis: Any, keys: Keys):
    await history(pg, redis, keys)
    await pg.execute("UPDATE links SET leads = 7")  # A has 1 lead, B none
    first, second = [tuple(r) for r in await pg.fetch("SELECT id, code FROM links ORDER BY id")]
    async with pg.acquire() as conn, conn.transaction():
        # a batch in flight on the second link (in id order): the first is fixed meanwhile
        await conn.execute("SELECT 1 FROM links WHERE id = $1 FOR UPDATE", second[0])
        fixing = asyncio.create_task(reconcile(pg, fix=True, chunk=1))
        fixed = "SELECT leads FROM links WHERE id = $1"
        want = 1 if first[1] == "A" else 0

        async def first_fixed() -> bool:
            return bool(await pg.fetchval(fixed, first[0]) == want)

        await wait_for(first_fixed, timeout=20, what="the first chunk's fix")
        assert not fixing.done()  # waiting for the second link's lock, and only for it
        assert await pg.fetchval(fixed, second[0]) == 7
    assert sorted(await fixing, key=lambda d: d.code) == [Drift("A", "leads", 7, 1), Drift("B", "leads", 7, 0)]
    assert await reconcile(pg, fix=False) == []


async def test_the_window_leaves_the_days_outside_it_as_they_are(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
):
    await history(pg, redis, keys)
    # day 1's row and the total, both 3 clicks up: the history says so, the events do not
    await pg.execute(
        "UPDATE daily_stats SET clicks = clicks + 3 WHERE day = '2024-03-01'"
        " AND link_id = (SELECT id FROM links WHERE code = 'A')"
    )
    await pg.execute("UPDATE links SET clicks = clicks + 3 WHERE code = 'A'")
    assert (await run(settings, "reconcile", "--since", "2024-03-02", "--json"))[:2] == (
        0,
        {"drift": [], "fixed": False},
    )
    code, out, _ = await run(settings, "reconcile", "--until", "2024-03-02", "--json")
    assert code == 1 and out["drift"] == [
        {"code": "A", "counter": "clicks", "stored": 10, "recomputed": 7},
        {"code": "A", "counter": "clicks", "day": "2024-03-01", "stored": 9, "recomputed": 6},
    ]
    code, _, err = await run(settings, "reconcile", "--since", "2024-03-02", "--until", "2024-03-01")
    assert code == 2 and "--until must come after --since" in err
    assert await reconcile(pg, fix=True, since=date(2024, 3, 2)) == []
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 10  # left as it was
    assert len(await reconcile(pg, fix=True)) == 2
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'A'") == 7


async def test_test_mode_and_days_without_events_count_nothing(pg: asyncpg.Pool, redis: Any, keys: Keys):
    await history(pg, redis, keys)
    b = await pg.fetchrow("SELECT clicks, unique_clicks FROM links WHERE code = 'B'")
    assert tuple(b) == (2, 2)  # w on day 1 and on day 2; x was test mode
    await pg.execute(
        "DELETE FROM events WHERE (received_at AT TIME ZONE 'UTC')::date = $1"
        " AND link_id = (SELECT id FROM links WHERE code = 'B')",
        date(2024, 3, 2),
    )
    drift = await reconcile(pg, fix=True)
    assert {(d.counter, d.day) for d in drift} >= {
        ("clicks", None),
        ("unique_clicks", None),
        ("clicks", date(2024, 3, 2)),
    }
    assert await pg.fetch("SELECT day FROM daily_stats d JOIN links l ON l.id = d.link_id WHERE l.code = 'B'") == [
        (date(2024, 3, 1),)
    ]
    assert await reconcile(pg, fix=False) == []
