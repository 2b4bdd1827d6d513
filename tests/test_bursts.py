"""The click_burst rule's windows (``workers.consumer.bursts``) and its pass after the
batch's commit (``workers.consumer.burst_pass``), against the rule's definition read from
the stored rows: a click is flagged when its link's clicks from its address, in (received
time, event id) order up to it and within the window, number more than the threshold.
Batches in time order flag exactly those; batches out of order flag no click that has not
earned it; a window holds at most the threshold + 1 clicks, and goes once past its time.
A flag is judged after its batch's commit, once by event id however often its click is
judged, by a later pass when the one after its commit never ran or failed, and within
the two seconds docs/guarantees.md states by a running worker."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any
from uuid import UUID

import asyncpg

from ingest.contract import erasure as ledger
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.manage import admin
from ingest.privacy import erasure as pg_erasure
from workers.consumer import burst_pass, bursts
from workers.consumer.enrich import Enricher
from workers.consumer.store import write_batch

from ._procs import Procs
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
# the link's click_burst flags, in any form (schema 25's view: burst_flags, event_flags, or
# as schemas 18 to 22 stored one the workspace did not exclude, on the click's row)
FLAGS = """
SELECT f.event_id, (f.evidence->>'clicks')::int AS clicks, (f.evidence->>'threshold_clicks')::int AS threshold
FROM click_burst_flags f JOIN events e USING (event_id) WHERE e.link_id = $1
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


async def judge(pg: asyncpg.Pool) -> int:
    """Pass until nothing is left to judge, as the workers do on their timer: new flags."""
    flagged = 0
    while (done := await burst_pass.run(pg)).taken:
        flagged += done.flagged
    return flagged


async def flagged_count(pg: asyncpg.Pool, link_id: Any) -> int:
    """The link's click_burst flags as drop_stats counts them."""
    n = await pg.fetchval(
        "SELECT sum(n) FROM drop_stats WHERE link_id = $1 AND reason = 'flagged' AND detail = 'click_burst'", link_id
    )
    return int(n or 0)


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
    of 20: the 280 past it are flagged after the commit, each with the count where counting
    stopped (ids of a burst_flags row, nothing on the click's row); the window holds the newest 21
    of them, not the 300, and one more click counts 21. A redelivered copy of the burst
    leaves nothing to judge."""
    ws, link = await _link(pg, redis, keys, "sustained")
    at = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms - 40_000
    sent = []
    for first in range(0, 300, 100):  # three batches, 100 ms apart each click: 30 s in all
        batch = [_click(ws, "sustained", "198.51.100.9", at + 100 * i) for i in range(first, first + 100)]
        sent += batch
        await write_batch(pg, batch)
    assert not await pg.fetch(FLAGS, link["id"])  # judged after the commit, by the pass
    assert await judge(pg) == 280
    flagged = await pg.fetch(FLAGS, link["id"])
    assert len(flagged) == 280 and {r["clicks"] for r in flagged} == {21}
    stored = await pg.fetch(
        "SELECT excluded, evidence FROM click_burst_flags WHERE event_id = ANY($1::uuid[])", [c.event_id for c in sent]
    )
    assert {(r["excluded"], tuple(sorted(r["evidence"].items()))) for r in stored} == {
        (False, (("clicks", 21), ("threshold_clicks", 20), ("window_seconds", 60)))
    }
    assert not await pg.fetchval(
        "SELECT count(*) FROM events WHERE link_id = $1 AND burst_clicks IS NOT NULL", link["id"]
    )
    assert await flagged_count(pg, link["id"]) == 280
    window = await pg.fetchrow("SELECT keep, clicks FROM burst_windows WHERE link_id = $1", link["id"])
    newest = sorted((c.received_at_ms, c.event_id) for c in sent)[-21:]
    assert window["keep"] == 21 and held(window["clicks"]) == newest

    one = _click(ws, "sustained", "198.51.100.9", at + 30_050)
    await write_batch(pg, [one])
    assert await judge(pg) == 1
    evidence = await pg.fetchval("SELECT evidence FROM click_burst_flags WHERE event_id = $1", one.event_id)
    assert evidence["threshold_clicks"] == 20
    # a redelivered copy of the burst (a reclaim, a replay) stores nothing, leaves nothing to
    # judge and changes no window
    assert (await write_batch(pg, [*sent[-50:], one])).inserted == 0
    assert not await pg.fetchval("SELECT count(*) FROM burst_pending WHERE clicks && $1", [one.event_id])
    assert await judge(pg) == 0
    again = await pg.fetchval("SELECT clicks FROM burst_windows WHERE link_id = $1", link["id"])
    newest = sorted((c.received_at_ms, c.event_id) for c in [*sent, one])[-21:]
    assert held(again) == newest
    assert len(await pg.fetch(FLAGS, link["id"])) == 281 == await flagged_count(pg, link["id"])


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
            await judge(pg)  # each batch's pass after its commit, as a worker keeping up
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
    await judge(pg)
    assert len(await pg.fetch(FLAGS, link["id"])) == 3 + 1
    async with pg.acquire() as conn:
        assert await bursts.prune(conn) >= 1
    left = await pg.fetch("SELECT host(ip) AS ip FROM burst_windows WHERE link_id = $1", link["id"])
    assert [r["ip"] for r in left] == ["198.51.100.31"]
    late = _click(ws, "pruned", "198.51.100.30", now)
    await write_batch(pg, [late])
    assert await judge(pg) == 0
    assert len(await pg.fetch(FLAGS, link["id"])) == 4
    row = await pg.fetchval("SELECT clicks FROM burst_windows WHERE link_id = $1 AND ip = '198.51.100.30'", link["id"])
    assert held(row) == [(late.received_at_ms, late.event_id)]


async def test_an_excluded_burst_keeps_its_flag_row_and_counts_nothing(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """A workspace that excludes click_burst: its clicks are judged in their batch's
    transaction, since the flag decides what they count: the flagged clicks move no
    counter, and their flags are ``event_flags`` rows (excluded, with the evidence), which
    reconcile reads; nothing on their rows, and nothing left for the pass."""
    ws, link = await _link(pg, redis, keys, "excluded", '{"burst_clicks": 2}')
    await pg.execute(
        """UPDATE workspaces SET fraud_policy = '{"click_burst": "exclude"}' WHERE id = $1""", ws["workspace_id"]
    )
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    sent = [_click(ws, "excluded", "198.51.100.40", now + i) for i in range(5)]
    await write_batch(pg, sent)
    assert not await pg.fetchval("SELECT count(*) FROM burst_pending WHERE clicks && $1", [c.event_id for c in sent])
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
    await judge(pg)  # the windows are made by the pass, after the commit
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


async def test_a_click_judged_twice_is_flagged_once(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """One event twice in a batch is one row and one click to judge; its burst judged once,
    then again (its pending row written again, as by a replay of the pass), flags nothing
    twice: no second flag, no second drop count, no second notice."""
    ws, link = await _link(pg, redis, keys, "twice", '{"burst_clicks": 2}')
    await pg.execute(
        "INSERT INTO webhooks (workspace_id, url, events, secret_encrypted, secret_prefix)"
        " VALUES ($1, 'https://example.com/h', $2, '\\x00'::bytea, 'whsec_')",
        ws["workspace_id"],
        ["fraud.flagged"],
    )
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    sent = [_click(ws, "twice", "198.51.100.50", now + i) for i in range(5)]
    assert (await write_batch(pg, [*sent, sent[-1]])).inserted == 5
    ids = [c.event_id for c in sent]
    assert await pg.fetchval("SELECT array_length(clicks, 1) FROM burst_pending WHERE clicks && $1", ids) == 5
    assert await judge(pg) == 3
    told = (
        "SELECT d.payload FROM webhook_deliveries d JOIN webhooks h ON h.id = d.webhook_id"
        " WHERE h.workspace_id = $1 AND d.event_type = 'fraud.flagged'"
    )
    notices = [r["payload"] for r in await pg.fetch(told, ws["workspace_id"])]
    assert sorted(n["event_id"] for n in notices) == sorted(str(c.event_id) for c in sent[2:])
    assert {(f["rule"], f["evidence"]["ip"], f["evidence"]["clicks"]) for n in notices for f in n["flags"]} == {
        ("click_burst", "198.51.100.50", 3)
    }
    await pg.execute("INSERT INTO burst_pending (clicks) VALUES ($1)", ids)
    assert await judge(pg) == 0
    assert len(await pg.fetch(FLAGS, link["id"])) == 3 == await flagged_count(pg, link["id"])
    assert len(await pg.fetch(told, ws["workspace_id"])) == 3


async def test_a_passs_notices_go_to_the_workspaces_whose_webhooks_hear_fraud_flagged(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """One pass over three workspaces' bursts, each flagged: a notice per flag where an
    active webhook hears fraud.flagged, none where the webhook hears other events or is
    paused. Whether a workspace hears is read once a workspace, not once a click."""
    await judge(pg)  # what other tests left: this one's pass judges its own alone
    hook = (
        "INSERT INTO webhooks (workspace_id, url, events, active, secret_encrypted, secret_prefix)"
        " VALUES ($1, 'https://example.com/h', $2, $3, '\\x00'::bytea, 'whsec_')"
    )
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    sent: dict[str, list[Envelope]] = {}
    spaces = {}
    for code, events, active in (
        ("hears", ["fraud.flagged"], True),
        ("deaf", ["lead.created"], True),
        ("paused", ["fraud.flagged"], False),
    ):
        ws, _ = await _link(pg, redis, keys, code, '{"burst_clicks": 2}')
        await pg.execute(hook, ws["workspace_id"], events, active)
        spaces[code] = ws["workspace_id"]
        sent[code] = [_click(ws, code, "198.51.100.90", now + i) for i in range(6)]
    await write_batch(pg, [c for clicks in sent.values() for c in clicks])
    assert await judge(pg) == 3 * 4
    told = (
        "SELECT h.workspace_id, d.payload->>'event_id' AS event_id FROM webhook_deliveries d"
        " JOIN webhooks h ON h.id = d.webhook_id WHERE d.event_type = 'fraud.flagged' AND h.workspace_id = ANY($1)"
    )
    rows = await pg.fetch(told, list(spaces.values()))
    assert {str(r["workspace_id"]) for r in rows} == {str(spaces["hears"])}
    assert sorted(r["event_id"] for r in rows) == sorted(str(c.event_id) for c in sent["hears"][2:])


async def test_a_pass_writes_its_flags_as_rows_of_a_link_in_id_order(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """A pass's flags are ``burst_flags`` rows (schema 25): per link and day, their ids in
    order, ``ROW_IDS`` at most, keyed by the last; the link's thresholds once. 1,000 clicks
    past a threshold of 2 in one pass are 998 flags in three rows; a second link's its own."""
    ws, link = await _link(pg, redis, keys, "rows", '{"burst_clicks": 2, "burst_seconds": 90}')
    async with pg.acquire() as conn:
        other = await admin.create_link(conn, redis, keys, workspace_id=ws["workspace_id"], code="rows2")
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms - 30_000
    sent = [_click(ws, "rows", "198.51.100.60", now + 10 * i) for i in range(1000)]
    theirs = [_click(ws, "rows2", "198.51.100.60", now + 10 * i) for i in range(4)]
    await write_batch(pg, sent + theirs)
    assert await judge(pg) == 998 + 2
    rows = await pg.fetch("SELECT * FROM burst_flags WHERE link_id = $1 ORDER BY last_id", link["id"])
    assert [len(r["ids"]) for r in rows] == [burst_pass.ROW_IDS, burst_pass.ROW_IDS, 998 - 2 * burst_pass.ROW_IDS]
    ids = [i for r in rows for i in r["ids"]]
    assert ids == sorted(ids) and all((r["first_id"], r["last_id"]) == (r["ids"][0], r["ids"][-1]) for r in rows)
    assert set(ids) == {c.event_id for c in sorted(sent, key=lambda c: (c.received_at_ms, c.event_id))[2:]}
    assert {(r["clicks"], r["seconds"], r["workspace_id"]) for r in rows} == {(2, 90, UUID(ws["workspace_id"]))}
    (row,) = await pg.fetch("SELECT ids FROM burst_flags WHERE link_id = $1", other["id"])
    assert len(row["ids"]) == 2
    assert await flagged_count(pg, link["id"]) == 998 and not await pg.fetchval("SELECT count(*) FROM event_flags")


async def test_clicks_committed_and_never_judged_are_judged_by_a_later_pass(
    pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """The batch commits and no pass follows (its worker stopped there): its clicks wait in
    ``burst_pending``, unflagged. A pass that fails midway (after its flags' insert) rolls
    back with them: the clicks are still there, still unflagged. The next pass flags them."""
    ws, link = await _link(pg, redis, keys, "crashed", '{"burst_clicks": 2}')
    await judge(pg)  # what other tests left: this one's pass judges its own alone
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    sent = [_click(ws, "crashed", "198.51.100.60", now + i) for i in range(4)]
    await write_batch(pg, sent)
    left = "SELECT count(*) FROM burst_pending WHERE clicks && $1"
    assert await pg.fetchval(left, [c.event_id for c in sent]) == 1
    assert not await pg.fetch(FLAGS, link["id"])

    class Cut(Exception):
        pass

    try:
        async with pg.acquire() as conn, conn.transaction():
            assert (await burst_pass._pass(conn, burst_pass.PASS_ROWS)).flagged == 2
            raise Cut  # the pass's worker dies before its commit
    except Cut:
        pass
    assert await pg.fetchval(left, [c.event_id for c in sent]) == 1
    assert not await pg.fetch(FLAGS, link["id"]) and await flagged_count(pg, link["id"]) == 0
    assert await judge(pg) == 2
    assert len(await pg.fetch(FLAGS, link["id"])) == 2 == await flagged_count(pg, link["id"])


async def test_a_click_erased_before_its_pass_is_not_judged(pg: asyncpg.Pool, redis: Any, keys: Keys) -> None:
    """The pass reads its clicks as committed: a click whose address an erasure scrubbed
    between its commit and the pass joins no window and is not flagged."""
    ws, link = await _link(pg, redis, keys, "scrubbed", '{"burst_clicks": 1}')
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    sent = [_click(ws, "scrubbed", "198.51.100.70", now + i) for i in range(3)]
    await write_batch(pg, sent)
    await pg.execute("UPDATE events SET ip = NULL WHERE event_id = $1", sent[2].event_id)  # as an erasure's scrub
    assert await judge(pg) == 1
    assert [r["event_id"] for r in await pg.fetch(FLAGS, link["id"])] == [sent[1].event_id]
    window = await pg.fetchval("SELECT clicks FROM burst_windows WHERE link_id = $1", link["id"])
    assert [i for _, i in held(window)] == [c.event_id for c in sent[:2]]


async def test_a_running_worker_flags_a_burst_within_two_seconds_of_its_commit(
    procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """The bound docs/guarantees.md states: a worker passes four times a second, so a
    burst's flags are there within two seconds of its batch's commit."""
    ws, link = await _link(pg, redis, keys, "timely", '{"burst_clicks": 2}')
    procs.start("work", REFSTREAM_CONSUMER_NAME="timely")
    # the worker is passing once a row it was left is gone (ids of no event: judged as none)
    marker = await pg.fetchval("INSERT INTO burst_pending (clicks) VALUES (ARRAY[gen_random_uuid()]) RETURNING id")
    deadline = time.monotonic() + 60
    while await pg.fetchval("SELECT count(*) FROM burst_pending WHERE id = $1", marker):
        assert time.monotonic() < deadline, procs.logs()
        await asyncio.sleep(0.05)
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    await write_batch(pg, [_click(ws, "timely", "198.51.100.80", now + i) for i in range(5)])
    committed = time.monotonic()
    while len(await pg.fetch(FLAGS, link["id"])) < 3:
        assert time.monotonic() - committed < 2.0, "no flags within 2 s of the commit"
        await asyncio.sleep(0.02)
    assert await flagged_count(pg, link["id"]) == 3


async def test_a_drains_burst_pass_queues_its_notices_webhook_jobs_for_the_workers(
    procs: Procs, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    """``work --drain`` with no worker running: the fraud.flagged deliveries its pass made
    are jobs on the workers' queue when it exits, not rows left for a worker's sweep."""
    ws, link = await _link(pg, redis, keys, "drained", '{"burst_clicks": 2}')
    await pg.execute(
        "INSERT INTO webhooks (workspace_id, url, events, secret_encrypted, secret_prefix)"
        " VALUES ($1, 'https://hooks.example/flags', ARRAY['fraud.flagged'], 'x', 'whsec_x')",
        ws["workspace_id"],
    )
    now = Envelope(EventType.CLICK, Dialect.BIORE, {}).received_at_ms
    await write_batch(pg, [_click(ws, "drained", "198.51.100.81", now + i) for i in range(4)])
    await procs.cli("work", "--drain")
    made = {str(r["id"]) for r in await pg.fetch("SELECT id FROM webhook_deliveries WHERE status = 'pending'")}
    assert len(made) == 2 == len(await pg.fetch(FLAGS, link["id"]))
    queued = {m.decode() for m in await redis.zrange(keys.arq_queue, 0, -1)}
    assert queued == {f"webhook:{d}" for d in made}
