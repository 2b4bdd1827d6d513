"""The click_burst rule's windows (``workers.consumer.bursts``), against the rule's
definition read from the stored rows: a click is flagged when its link's clicks from its
address, in (received time, event id) order up to it and within the window, number more
than the threshold. Batches in time order flag exactly those; batches out of order flag
no click that has not earned it; a window holds at most the threshold + 1 clicks, and goes
once past its time."""

from __future__ import annotations

import random
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure
from workers.consumer import bursts
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch

from ._world import BROWSER

# the rule's definition over the stored rows (the generative checker's, with the
# evidence's threshold and window)
DEFINED = """
SELECT e.event_id,
       (SELECT count(*) FROM events o
         WHERE o.link_id = e.link_id AND o.type = 1 AND NOT o.test_mode AND o.ip = e.ip
           AND o.received_at > e.received_at - make_interval(secs => $2)
           AND (o.received_at, o.event_id) <= (e.received_at, e.event_id)) AS in_window
FROM events e WHERE e.link_id = $1 AND e.type = 1 AND NOT e.is_bot
"""
# the link's click_burst flags, on their rows or (excluded) in event_flags
FLAGS = """
SELECT event_id, burst_clicks + 1 AS clicks, burst_clicks AS threshold FROM events
WHERE link_id = $1 AND burst_clicks IS NOT NULL
UNION ALL
SELECT f.event_id, (f.evidence->>'clicks')::int, (f.evidence->>'threshold_clicks')::int
FROM event_flags f JOIN events e USING (event_id) WHERE f.rule = 'click_burst' AND e.link_id = $1
"""


async def _link(pg: asyncpg.Pool, redis: Any, keys: Keys, code: str, thresholds: str | None = None) -> Any:
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, f"Bursts {code}")
        link = await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code=code)
        if thresholds is not None:
            await conn.execute(
                f"UPDATE programs SET fraud_thresholds = '{thresholds}' WHERE workspace_id = $1", ws["workspace_id"]
            )
    return ws, link


def held(clicks: bytes) -> list[tuple[int, UUID]]:
    """A window's ``burst_windows.clicks`` (schema 21): 24-byte entries, a click's time in ms
    (8 bytes, big-endian) and its event id."""
    starts = range(0, len(clicks), 24)
    return [(int.from_bytes(clicks[j : j + 8], "big"), UUID(bytes=clicks[j + 8 : j + 24])) for j in starts]


def _click(ws: Any, code: str, ip: str, ms: int) -> Envelope:
    return Envelope(
        EventType.CLICK,
        Dialect.BIORE,
        {"code": code},
        workspace_id=ws["workspace_id"],
        ip=ip,
        user_agent=BROWSER,
        received_at_ms=ms,
    )


async def test_a_sustained_burst_counts_each_click_to_the_threshold_plus_one(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """300 clicks from one address on one link within a minute, past the default threshold
    of 20: the 280 past it are flagged, each with the count where counting stopped; the
    window holds the newest 21 of them, not the 300, and one more click counts 21."""
    ws, link = await _link(pg, redis, keys, "sustained")
    at = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms - 40_000
    sent = []
    for first in range(0, 300, 100):  # three batches, 100 ms apart each click: 30 s in all
        batch = [_click(ws, "sustained", "198.51.100.9", at + 100 * i) for i in range(first, first + 100)]
        sent += batch
        await write_batch(pg, batch)
    flagged = await pg.fetch(FLAGS, link["id"])
    assert len(flagged) == 280 and {r["clicks"] for r in flagged} == {21}
    assert not await pg.fetchval(
        "SELECT count(*) FROM event_flags WHERE event_id = ANY($1::uuid[])", [c.event_id for c in sent]
    )
    window = await pg.fetchrow("SELECT keep, clicks FROM burst_windows WHERE link_id = $1", link["id"])
    newest = sorted((c.received_at_ms, c.event_id) for c in sent)[-21:]
    assert window["keep"] == 21 and held(window["clicks"]) == newest

    one = _click(ws, "sustained", "198.51.100.9", at + 30_050)
    await write_batch(pg, [one])
    assert await pg.fetchval("SELECT burst_clicks FROM events WHERE event_id = $1", one.event_id) == 20
    # a redelivered copy of the burst (a reclaim, a replay) stores nothing and changes no window
    assert (await write_batch(pg, [*sent[-50:], one])).inserted == 0
    again = await pg.fetchval("SELECT clicks FROM burst_windows WHERE link_id = $1", link["id"])
    newest = sorted((c.received_at_ms, c.event_id) for c in [*sent, one])[-21:]
    assert held(again) == newest
    assert len(await pg.fetch(FLAGS, link["id"])) == 281


async def test_flags_are_the_definitions_in_time_order_and_always_earned_out_of_it(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """Clicks from four addresses (a bot among them) on one link, threshold 3 in 2 s, drawn
    at random over a minute, some in one millisecond. Stored in batches in time order, the
    flagged clicks are exactly those the definition names; stored in shuffled batches (late
    clicks, a window that no longer holds what came before), every flag is earned and its
    evidence is where counting stops."""
    rng = random.Random(37)
    enricher = Enricher()
    for code, ordered in (("burstsorder", True), ("burstsshuffle", False)):
        ws, link = await _link(pg, redis, keys, code, '{"burst_clicks": 3, "burst_seconds": 2}')
        t0 = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms - 70_000
        ips = ["198.51.100.20", "198.51.100.21", "2001:db8::21", "198.51.100.22"]
        sent = []
        for _ in range(400):
            ms = t0 + rng.choice([rng.randrange(60_000), rng.randrange(600) * 100])  # some share a millisecond
            c = _click(ws, code, rng.choice(ips), ms)
            if rng.random() < 0.1:
                c = Envelope(
                    EventType.CLICK,
                    Dialect.BIORE,
                    {"code": code},
                    workspace_id=ws["workspace_id"],
                    ip=c.ip,
                    user_agent="curl/8.0",  # a bot's click: counted, never flagged
                    received_at_ms=ms,
                )
            sent.append(c)
        if ordered:
            sent.sort(key=lambda c: (c.received_at_ms, c.event_id))
        else:
            rng.shuffle(sent)
        i = 0
        while i < len(sent):
            n = rng.randrange(1, 60)
            await write_batch(pg, sent[i : i + n], enricher)
            i += n
        assert await pg.fetchval("SELECT count(*) FROM events WHERE link_id = $1 AND is_bot", link["id"]) > 10
        defined = {r["event_id"] for r in await pg.fetch(DEFINED, link["id"], 2) if r["in_window"] > 3}
        flags = await pg.fetch(FLAGS, link["id"])
        flagged = {r["event_id"] for r in flags}
        assert {(r["clicks"], r["threshold"]) for r in flags} == {(4, 3)}
        assert flagged <= defined, f"{len(flagged - defined)} flags not earned"
        if ordered:
            assert flagged == defined and len(defined) > 50
        else:
            assert flagged and len(flagged) < len(defined)  # late clicks count short, never over


async def test_a_window_past_its_time_goes_and_a_later_click_starts_afresh(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """A burst two minutes ago leaves a window past its time: ``prune`` deletes it (and
    leaves a window still in its time); the next click from the address is not flagged."""
    ws, link = await _link(pg, redis, keys, "pruned", '{"burst_clicks": 2, "burst_seconds": 10}')
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    await write_batch(pg, [_click(ws, "pruned", "198.51.100.30", now - 120_000 + i) for i in range(5)])
    await write_batch(pg, [_click(ws, "pruned", "198.51.100.31", now - i) for i in range(3)])
    assert len(await pg.fetch(FLAGS, link["id"])) == 3 + 1
    async with pg.acquire() as conn:
        assert await bursts.prune(conn) >= 1
    left = await pg.fetch("SELECT host(ip) AS ip FROM burst_windows WHERE link_id = $1", link["id"])
    assert [r["ip"] for r in left] == ["198.51.100.31"]
    late = _click(ws, "pruned", "198.51.100.30", now)
    await write_batch(pg, [late])
    assert len(await pg.fetch(FLAGS, link["id"])) == 4
    row = await pg.fetchval("SELECT clicks FROM burst_windows WHERE link_id = $1 AND ip = '198.51.100.30'", link["id"])
    assert held(row) == [(late.received_at_ms, late.event_id)]


async def test_an_excluded_burst_keeps_its_flag_row_and_counts_nothing(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """A workspace that excludes click_burst: the flagged clicks move no counter, and their
    flags are ``event_flags`` rows (excluded, with the evidence), which reconcile reads;
    nothing on their rows."""
    ws, link = await _link(pg, redis, keys, "excluded", '{"burst_clicks": 2}')
    await pg.execute(
        """UPDATE workspaces SET fraud_policy = '{"click_burst": "exclude"}' WHERE id = $1""", ws["workspace_id"]
    )
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    await write_batch(pg, [_click(ws, "excluded", "198.51.100.40", now + i) for i in range(5)])
    rows = await pg.fetch(
        "SELECT f.excluded, f.evidence, e.burst_clicks FROM event_flags f JOIN events e USING (event_id)"
        " WHERE f.rule = 'click_burst' AND e.link_id = $1",
        link["id"],
    )
    assert [(r["excluded"], r["burst_clicks"]) for r in rows] == [(True, None)] * 3
    assert all(r["evidence"] == {"clicks": 3, "threshold_clicks": 2, "window_seconds": 60} for r in rows)
    assert await pg.fetchval("SELECT clicks FROM links WHERE id = $1", link["id"]) == 2


async def test_an_erasure_deletes_its_persons_windows_in_both_tables(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """An erasure deletes the windows of its person's clicks (their link and address): in
    schema 21's ``burst_windows``, and in schema 18's ``click_windows``, which a worker of an
    older build may still write during an upgrade. Another address's window stays."""
    ws, link = await _link(pg, redis, keys, "erased")
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    mine = _click(ws, "erased", "198.51.100.40", now)
    mine.payload["visitor_id"] = "v-erased"
    other = _click(ws, "erased", "198.51.100.41", now + 1)
    lead = {"code": "erased", "visitor_id": "v-erased", "external_id": "cus_w", "name": "Sign Up"}
    signed = Envelope(EventType.LEAD, Dialect.REFPORT, lead, ws["workspace_id"], received_at_ms=now + 2)
    assert (await write_batch(pg, [mine, other, signed])).inserted == 3
    async with pg.acquire() as conn:
        await conn.execute(
            "INSERT INTO click_windows (link_id, ip, keep, until, ats, ids)"
            " VALUES ($1, '198.51.100.40', 21, now() + interval '1 minute', ARRAY[$2::bigint], ARRAY[$3::uuid])",
            link["id"],
            now,
            mine.event_id,
        )
    ledger.forget_salt()  # the process's salt is this database's for the erasure, then no one's
    try:
        done = await pg_erasure.erase(pg, ws["workspace_id"], "cus_w", by="test", archive_days=30)
    finally:
        ledger.forget_salt()
    assert done.rows["burst_windows"] == 1 and done.rows["click_windows"] == 1
    left = await pg.fetch("SELECT host(ip) AS ip FROM burst_windows WHERE link_id = $1", link["id"])
    assert [r["ip"] for r in left] == ["198.51.100.41"]
    assert await pg.fetchval("SELECT count(*) FROM click_windows WHERE link_id = $1", link["id"]) == 0
