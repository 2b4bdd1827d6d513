"""Exactly right at volume: every counter equal to its event rows after a mixed drain (100k
events at length, 10k in scripts/test), and after clicks split over two workers, one of
them SIGKILLed mid-run (20k at length, 4k in scripts/test).

Marker ``soak``: scripts/test's first pass runs the short sizes; ``REFSTREAM_FAULTS=full``
(``./scripts/faults``, which runs this file) the long ones."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import asyncpg
import pytest

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD

from ._procs import Procs
from ._world import make_world
from .conftest import wait_for

# exactness at volume is the worker's, whichever Postgres: scripts/test runs it in the first pass only
pytestmark = [pytest.mark.once, pytest.mark.soak]

FULL = os.environ.get("REFSTREAM_FAULTS", "short") == "full"
MIXED = 100_000 if FULL else 10_000  # events of the mixed drain, and 2% of them delivered twice
KILLED = 20_000 if FULL else 4_000  # clicks over the two workers, one of them killed

UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4"
    " Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
]

# every link counter against the event rows it was moved from; no row means no drift
DRIFT = """
SELECT l.code FROM links l LEFT JOIN (
    SELECT link_id,
           count(*) FILTER (WHERE type = 1 AND NOT is_bot AND NOT test_mode) AS clicks,
           count(*) FILTER (WHERE type = 1 AND is_bot AND NOT test_mode) AS bot_clicks,
           count(*) FILTER (WHERE type = 2 AND NOT test_mode AND NOT out_of_window) AS leads,
           count(*) FILTER (WHERE type = 3 AND NOT test_mode AND NOT out_of_window) AS conversions
    FROM events GROUP BY link_id) e ON e.link_id = l.id
LEFT JOIN (SELECT link_id, sum(clicks) AS clicks, sum(unique_clicks) AS uniq, sum(bot_clicks) AS bots,
                  sum(leads) AS leads, sum(conversions) AS conversions FROM daily_stats GROUP BY link_id) d
       ON d.link_id = l.id
LEFT JOIN (SELECT link_id, count(*) AS uniq FROM link_visitor_days GROUP BY link_id) u ON u.link_id = l.id
WHERE l.clicks <> coalesce(e.clicks, 0) OR l.bot_clicks <> coalesce(e.bot_clicks, 0)
   OR l.leads <> coalesce(e.leads, 0) OR l.conversions <> coalesce(e.conversions, 0)
   OR l.clicks <> coalesce(d.clicks, 0) OR l.bot_clicks <> coalesce(d.bots, 0) OR l.leads <> coalesce(d.leads, 0)
   OR l.conversions <> coalesce(d.conversions, 0) OR l.unique_clicks <> coalesce(d.uniq, 0)
   OR l.unique_clicks <> coalesce(u.uniq, 0) OR l.unique_clicks > l.clicks
"""


def mixed(codes: dict[str, str], n: int, rng: random.Random) -> list[Envelope]:
    """Clicks (browser, bot, test mode, seed 000), leads with repeats, conversions with repeats."""
    out = []
    t0 = 1_790_000_000_000
    for i in range(n):
        code = rng.choice(list(codes))
        ws = codes[code]
        at = t0 + rng.randrange(3 * 86_400_000)  # three UTC days
        visitor = f"v{rng.randrange(3000)}"
        kind = rng.random()
        if kind < 0.55:
            payload: dict[str, object] = {"code": code, "visitor_id": visitor}
            if rng.random() < 0.03:
                payload["test_mode"] = True
            out.append(
                Envelope(
                    type=EventType.CLICK,
                    dialect=Dialect.AFFITOR,
                    workspace_id=ws,
                    received_at_ms=at,
                    ip=f"81.2.{i % 250}.{i % 199}",
                    user_agent=rng.choice(UAS),
                    payload=payload,
                )
            )
        elif kind < 0.7:
            out.append(
                Envelope(
                    type=EventType.CLICK,
                    dialect=Dialect.BIORE,
                    received_at_ms=at,
                    ip=f"77.88.{i % 250}.{i % 97}",
                    user_agent=rng.choice(UAS),
                    payload={"code": code},
                )
            )
        elif kind < 0.9:
            out.append(
                Envelope(
                    type=EventType.LEAD,
                    dialect=Dialect.REFPORT,
                    workspace_id=ws,
                    received_at_ms=at,
                    payload={
                        "code": code,
                        "visitor_id": visitor,
                        "external_id": f"u{rng.randrange(4000)}",
                        "name": rng.choice(["Sign Up", "Activated"]),
                    },
                )
            )
        else:
            out.append(
                Envelope(
                    type=EventType.CONVERSION,
                    dialect=Dialect.BRICQS,
                    workspace_id=ws,
                    received_at_ms=at,
                    payload={"code": code, "visitor_id": visitor, "dedupe": f"{code}:{rng.randrange(2000)}"},
                )
            )
    return out


async def append(redis, keys: Keys, envelopes: list[Envelope]) -> None:
    for start in range(0, len(envelopes), 5000):
        pipe = redis.pipeline(transaction=False)
        for e in envelopes[start : start + 5000]:
            pipe.xadd(keys.stream_for(e.payload["code"]), {FIELD: wire.to_blob(e)})
        await pipe.execute()


async def links(pg: asyncpg.Pool, redis, keys: Keys, n: int) -> dict[str, str]:
    codes: dict[str, str] = {}
    for w in range(2):
        world = await make_world(pg, redis, keys, code=f"W{w}L0", name=f"W{w}")
        codes[f"W{w}L0"] = world.workspace_id
        async with pg.acquire() as conn:
            for i in range(1, n):
                await conn.execute(
                    "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url)"
                    " VALUES ($1, $2, $3, $4, 'https://x.test')",
                    world.workspace_id,
                    world.program_id,
                    world.affiliate_id,
                    f"W{w}L{i}",
                )
                codes[f"W{w}L{i}"] = world.workspace_id
    return codes


async def test_a_mixed_drain_leaves_every_counter_equal_to_its_rows(procs: Procs, pg, redis, keys: Keys):
    rng = random.Random(42)
    codes = await links(pg, redis, keys, 25)
    events = mixed(codes, MIXED, rng)
    twice = MIXED // 50
    await append(redis, keys, events + rng.sample(events, twice))  # and 2% delivered twice
    totals = await procs.cli("work", "--drain", REFSTREAM_BATCH_SIZE="1000", timeout=600)
    assert totals["entries"] == MIXED + twice and totals["dead"] == 0
    assert totals["inserted"] + totals["duplicates"] == MIXED + twice
    assert totals["duplicates"] >= twice  # the redeliveries, plus repeated leads and conversions
    assert await pg.fetchval("SELECT count(*) FROM events") == totals["inserted"]
    assert await pg.fetch(DRIFT) == []
    # the checks compared real numbers (the thresholds of the 100k drain, in proportion)
    assert await pg.fetchval("SELECT sum(clicks) FROM links") > MIXED // 4
    assert await pg.fetchval("SELECT count(*) FROM events WHERE test_mode") > 0
    assert await pg.fetchval("SELECT sum(bot_clicks) FROM links") > MIXED // 10


async def test_two_workers_one_killed_mid_run(procs: Procs, pg, redis, keys: Keys):
    rng = random.Random(7)
    codes = await links(pg, redis, keys, 10)
    events = [e for e in mixed(codes, KILLED * 3 // 2, rng) if e.type is EventType.CLICK][:KILLED]
    assert len(events) == KILLED
    await append(redis, keys, events)
    env = {"REFSTREAM_BATCH_SIZE": "100"}
    victim = procs.start("work", REFSTREAM_CONSUMER_NAME="victim", **env)
    procs.start("work", REFSTREAM_CONSUMER_NAME="survivor", **env)

    async def progressed() -> bool:
        events: int = await pg.fetchval("SELECT count(*) FROM events")
        return events > KILLED * 3 // 20

    await wait_for(progressed, timeout=120, what="the workers to get going")
    victim.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(victim.wait, 30) == -9
    procs.start("work", REFSTREAM_CONSUMER_NAME="replacement", **env)
    await procs.cli("work", "--drain", timeout=600)  # returns once every partition is read and acked

    assert await pg.fetchval("SELECT count(*) FROM events") == KILLED
    assert await pg.fetch(DRIFT) == []
    for stream in keys.streams:
        assert (await redis.xpending(stream, GROUP))["pending"] == 0
