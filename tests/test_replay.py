"""`refstream replay`: a processed range replayed changes nothing; a range lost to a
Postgres restore comes back exactly; the consumer group is never touched."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType, uuid7
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from refstream.commands.replay import RangeUsageError, parse_time
from workers.host.worker import consumer
from workers.ops.reconcile import reconcile
from workers.ops.replay import MAX_SEQ, Range, RangeError, replay_job

from ._procs import REFSTREAM, Procs, env_for
from ._world import BROWSER, make_world

HOUR = 3_600_000
START = datetime(2023, 11, 14, 21, tzinfo=UTC)  # six hours from here cross a UTC midnight
T0 = int(START.timestamp()) * 1000
UAS = [BROWSER, BROWSER, "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "curl/8.5.0"]


async def run(settings: Settings, *args: str) -> tuple[int, Any, str]:
    """A `refstream` command as a process: (exit code, stdout as JSON, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM, *args, env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, orjson.loads(out) if out.strip() else None, err.decode()


async def make_links(pg: asyncpg.Pool, redis: Any, keys: Keys, per_workspace: int) -> dict[str, str]:
    codes: dict[str, str] = {}
    for w in range(2):
        world = await make_world(pg, redis, keys, code=f"W{w}L0", name=f"W{w}")
        codes[f"W{w}L0"] = world.workspace_id
        for i in range(1, per_workspace):
            await pg.execute(
                "INSERT INTO links (workspace_id, program_id, affiliate_id, code, url) VALUES ($1, $2, $3, $4, 'https://x.test')",
                world.workspace_id,
                world.program_id,
                world.affiliate_id,
                f"W{w}L{i}",
            )
            codes[f"W{w}L{i}"] = world.workspace_id
    return codes


def history(codes: dict[str, str], n: int, rng: random.Random, hours: int = 6) -> list[Envelope]:
    """Clicks (browser, bot, test mode, seed 000), leads and conversions with repeats, over ``hours``.

    Event ids are minted at the receive time, as the edge does, and a lead's or conversion's
    repeats stay on one link: which of two repeats is stored then follows the stream order,
    the same in a replay as the first time (repeats in two partitions race by design)."""
    out: list[Envelope] = []
    for i in range(n):
        code = rng.choice(list(codes))
        ws, at, visitor, kind = codes[code], T0 + rng.randrange(hours * HOUR), f"v{rng.randrange(400)}", rng.random()
        if kind < 0.5:
            payload: dict[str, Any] = {"code": code, "visitor_id": visitor}
            if rng.random() < 0.03:
                payload["test_mode"] = True
            out.append(
                Envelope(
                    EventType.CLICK,
                    Dialect.AFFITOR,
                    payload,
                    ws,
                    f"81.2.{i % 250}.{i % 199}",
                    rng.choice(UAS),
                    received_at_ms=at,
                )
            )
        elif kind < 0.7:
            out.append(
                Envelope(
                    EventType.CLICK,
                    Dialect.BIORE,
                    {"code": code},
                    None,
                    f"77.88.{i % 50}.1",
                    rng.choice(UAS),
                    received_at_ms=at,
                )
            )
        elif kind < 0.9:
            payload = {
                "code": code,
                "visitor_id": visitor,
                "external_id": f"{code}:u{rng.randrange(60)}",
                "name": rng.choice(["Sign Up", "Activated"]),
            }
            out.append(Envelope(EventType.LEAD, Dialect.REFPORT, payload, ws, received_at_ms=at))
        else:
            payload = {"code": code, "visitor_id": visitor, "dedupe": f"{code}:{rng.randrange(300)}"}
            out.append(Envelope(EventType.CONVERSION, Dialect.BRICQS, payload, ws, received_at_ms=at))
    for e in out:
        e.event_id = uuid7(e.received_at_ms)
    return out


async def append(redis: Any, keys: Keys, envelopes: list[Envelope], garbage: int = 0) -> dict[str, list[str]]:
    """XADD in time order, each entry's stream id ms = its received_at_ms (as the edge's
    would be); ``garbage`` undecodable entries at the end of partition 0."""
    ids: dict[str, list[str]] = {s: [] for s in keys.streams}
    last: dict[str, tuple[int, int]] = {}
    pipe = redis.pipeline(transaction=False)
    for e in sorted(envelopes, key=lambda e: e.received_at_ms):
        stream = keys.stream_for(e.payload["code"])
        prev = last.get(stream, (0, -1))
        sid = (e.received_at_ms, prev[1] + 1 if prev[0] == e.received_at_ms else 0)
        last[stream] = sid
        ids[stream].append(f"{sid[0]}-{sid[1]}")
        pipe.xadd(stream, {FIELD: wire.to_blob(e)}, id=ids[stream][-1])
    for _ in range(garbage):
        pipe.xadd(keys.stream(0), {FIELD: b"not an envelope"})
    await pipe.execute()
    return ids


async def snapshot(pg: asyncpg.Pool) -> dict[str, Any]:
    return {
        "links": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT code, clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at"
                " FROM links ORDER BY code"
            )
        ],
        "daily": [
            tuple(r)
            for r in await pg.fetch(
                "SELECT link_id, day, workspace_id, program_id, affiliate_id, clicks, unique_clicks, bot_clicks, leads,"
                " conversions FROM daily_stats ORDER BY link_id, day"
            )
        ],
        "visitors": [tuple(r) for r in await pg.fetch("SELECT * FROM link_visitor_days ORDER BY 1, 2, 3")],
        "events": [r[0] for r in await pg.fetch("SELECT event_id FROM events ORDER BY 1")],
    }


async def groups(redis: Any, keys: Keys) -> list[Any]:
    return [await redis.xinfo_groups(s) for s in keys.streams]


async def test_replaying_a_processed_range_changes_nothing_and_a_dry_run_counts_it(
    procs: Procs, settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    rng = random.Random(3)
    codes = await make_links(pg, redis, keys, 5)
    events = history(codes, 1500, rng) + history({"NOSUCHCODE": next(iter(codes.values()))}, 5, rng)
    await append(redis, keys, events, garbage=1)
    drained = await procs.cli("work", "--drain")
    assert drained["entries"] == 1506 and drained["dead"] == 1
    before, group_state = await snapshot(pg), await groups(redis, keys)
    stored = len(before["events"])
    assert 1000 < stored < 1500  # repeated leads and conversions, unknown codes: stored once or never

    dry = await procs.cli("replay", "--dry-run", "--json")
    assert dry["dry_run"] is True
    # nothing new; what is not stored by event id produces no row by design, and says so
    assert dry["totals"] == {
        "entries": 1506,
        "archived": 0,
        "new": 0,
        "stored": stored,
        "repeats": 1500 - stored,
        "skipped": 5,
        "undecodable": 1,
        "failed": 0,
    }
    assert sum(p["entries"] for p in dry["partitions"].values()) == 1506
    assert await snapshot(pg) == before

    done = await procs.cli("replay", "--json")
    totals = done["totals"]
    assert totals["entries"] == 1506 and totals["inserted"] == 0 and totals["failed"] == 0
    assert (totals["undecodable"], totals["skipped"]) == (1, 5)
    assert totals["duplicates"] == 1500
    assert await snapshot(pg) == before
    assert await groups(redis, keys) == group_state  # XRANGE: no delivery, no pending, no lag moved

    # a window of one hour in one partition counts exactly the entries appended then
    p = keys.partition_for("W0L0")
    hour = [
        e
        for e in events
        if keys.partition_for(e.payload["code"]) == p and T0 + HOUR <= e.received_at_ms < T0 + 2 * HOUR
    ]
    since, until = (START + timedelta(hours=1)).isoformat(), (START + timedelta(hours=2)).isoformat()
    window = await procs.cli("replay", "--dry-run", "--json", "--since", since, "--until", until, "--partition", str(p))
    assert list(window["partitions"]) == [str(p)] and window["totals"]["entries"] == len(hour) > 0


async def test_a_range_lost_to_a_postgres_restore_comes_back_exactly(
    procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    rng = random.Random(11)
    codes = await make_links(pg, redis, keys, 8)
    await append(redis, keys, history(codes, 4000, rng))
    await procs.cli("work", "--drain")
    before = await snapshot(pg)
    assert await pg.fetchval("SELECT sum(bot_clicks) FROM links") > 0  # the snapshot has every kind of counter
    assert await pg.fetchval("SELECT sum(unique_clicks) FROM links") < await pg.fetchval(
        "SELECT sum(clicks) FROM links"
    )

    # the restore: a backup from before 23:00, i.e. that hour's rows gone and counters without them
    lost_from, lost_to = START + timedelta(hours=2), START + timedelta(hours=3)
    lost = await pg.fetchval(
        "WITH d AS (DELETE FROM events WHERE received_at >= $1 AND received_at < $2 RETURNING event_id),"
        # their dedupe keys are in the same backup
        " k AS (DELETE FROM event_dedupe WHERE event_id IN (SELECT event_id FROM d))"
        " SELECT count(*) FROM d",
        lost_from,
        lost_to,
    )
    assert lost > 400
    code, _, _ = await run(procs.settings, "reconcile", "--fix", "--json")
    assert code == 0
    restored = await snapshot(pg)
    assert restored["links"] != before["links"] and restored["daily"] != before["daily"]

    code, result, err = await run(
        procs.settings, "replay", "--since", lost_from.isoformat(), "--until", lost_to.isoformat(), "--json"
    )
    assert code == 0 and '"event"' not in err, err  # the answer on stdout, no log line after it
    assert result["totals"]["inserted"] == lost
    assert await snapshot(pg) == before  # every counter, daily row, unique visitor and event row
    assert await reconcile(pg, fix=False) == []


async def test_an_empty_or_invalid_range_exits_2(procs: Procs, redis: Any, keys: Keys, pg: asyncpg.Pool) -> None:
    codes = await make_links(pg, redis, keys, 1)
    await append(redis, keys, history(codes, 20, random.Random(1)))
    for args, message in [
        (("--from-id", "1700000000200-0", "--to-id", "1700000000100"), "empty range"),
        (("--since", "2023-11-15T05:00:00Z", "--until", "2023-11-15T04:00:00Z"), "empty range"),
        (("--since", "1h"), "holds no entries"),  # every entry is from 2023
        (("--partition", "9"), "no such partition"),
        (("--since", "yesterday"), "not a duration"),
    ]:
        code, out, err = await run(procs.settings, "replay", "--json", *args)
        assert (code, out) == (2, None), (args, err)
        assert message in err, (args, err)
    assert await pg.fetchval("SELECT count(*) FROM events") == 0


async def test_the_replay_job_runs_with_the_workers_context(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys
):
    codes = await make_links(pg, redis, keys, 3)
    events = history(codes, 600, random.Random(5))
    await append(redis, keys, events)
    async with consumer(settings) as c:
        ctx = {"consumer": c}
        first = await replay_job(ctx, since=START.isoformat(), partitions=list(range(keys.partitions)))
        again = await replay_job(ctx, from_id=str(T0), to_id=str(T0 + 6 * HOUR))
    assert first["totals"]["entries"] == again["totals"]["entries"] == 600
    assert first["totals"]["inserted"] == await pg.fetchval("SELECT count(*) FROM events") > 300
    assert again["totals"]["inserted"] == 0
    assert await pg.fetchval("SELECT sum(bot_clicks) FROM links") > 0  # the worker's enricher was used
    assert await reconcile(pg, fix=False) == []
    for stream in keys.streams:  # no group was created or read
        assert await redis.exists(stream) == 0 or await redis.xinfo_groups(stream) == []
    assert orjson.dumps(first)  # an arq job's result is JSON


def test_ranges_by_id_and_time() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    ms = int(at.timestamp()) * 1000
    assert Range(from_id="5", to_id="7").bounds() == ((5, 0), (7, MAX_SEQ))
    assert Range(from_id="5-3", to_id="7-1").bounds() == ((5, 3), (7, 1))
    assert Range(since=at, until=at + timedelta(seconds=1)).bounds() == ((ms, 0), (ms + 999, MAX_SEQ))
    assert Range(from_id=f"{ms + 10}-2", since=at).bounds()[0] == (ms + 10, 2)  # the intersection
    assert Range(since=at.replace(tzinfo=None)).bounds()[0] == (ms, 0)  # naive is UTC
    for bad in (Range(from_id="7", to_id="5"), Range(from_id="x"), Range(since=at, until=at)):
        with pytest.raises(RangeError):
            bad.bounds()
    now = datetime(2024, 1, 2, tzinfo=UTC)
    assert parse_time("2h", now=now) == now - timedelta(hours=2)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("30m", now=now) == now - timedelta(minutes=30)
    assert parse_time("2024-01-01T10:00:00") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    with pytest.raises(RangeUsageError):
        parse_time("soon")
