"""`refstream status`: the numbers a test planted, exactly, and an exit code a health check
can use."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from ingest.contract.keys import GROUP, Keys
from ingest.contract.wire import FIELD
from ingest.spool import store as spool_store
from workers.ops import status

from ._procs import REFSTREAM, Procs, env_for


async def _status(procs: Procs, *args: str, **env: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM,
        "status",
        *args,
        env=env_for(procs.settings, COLUMNS="200", **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 3), err.decode()
    return proc.returncode, orjson.loads(out) if "--json" in args else out.decode()


async def _plant(redis, pg, keys: Keys, spool: Path) -> str:
    """Partition 0: one entry two minutes old and ten fresh ones. "workers" read and acked
    all; "analytics" delivered six (a1: 4, one acked; a2: 2) and not the other five."""
    stream = keys.streams[0]
    now_ms = int(time.time() * 1000)
    ids = [await redis.xadd(stream, {FIELD: b"old"}, id=f"{now_ms - 120_000}-0")]
    ids += [await redis.xadd(stream, {FIELD: b"x%d" % i}) for i in range(10)]
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xgroup_create(stream, "analytics", id="0")
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=100)
    await redis.xack(stream, GROUP, *ids)
    await redis.xreadgroup("analytics", "a1", {stream: ">"}, count=4)
    await redis.xack(stream, "analytics", ids[1])
    await redis.xreadgroup("analytics", "a2", {stream: ">"}, count=2)
    for n in range(2):
        await redis.xadd(keys.dead, {"stream": stream, "id": ids[n], "error": "decode: bad", FIELD: b"?"})

    _spool(spool)

    # three events processed in the last minute, one long before
    ws = uuid.uuid4()
    for ago in (0, 1, 2, 600):
        await pg.execute(
            "INSERT INTO events (event_id, type, workspace_id, dialect, received_at, processed_at)"
            " VALUES ($1, 1, $2, 'biore', now(), now() - make_interval(secs => $3))",
            uuid.uuid4(),
            ws,
            float(ago),
        )
    return stream


def _spool(path: Path) -> None:
    """Two events in an edge spool (150 bytes: stream key and envelope), and a file that is not one."""
    conn = spool_store.connect(path)
    try:
        spool_store.insert(conn, [("s:0", b"a" * 97, None, None), ("s:1", b"b" * 47, None, None)], 1 << 20, False)
    finally:
        conn.close()
    (path / "notes.txt").write_bytes(b"not a segment")


GENEROUS = ("--max-lag", "1000", "--max-pending-age", "3600", "--max-dead", "10")


async def test_status_reports_what_was_planted(procs: Procs, redis, pg, keys: Keys, tmp_path: Path):
    stream = await _plant(redis, pg, keys, tmp_path / "edge-spool")
    code, snap = await _status(procs, "--json", *GENEROUS, "--spool-dir", str(tmp_path / "edge-spool"))
    assert code == 0 and snap["healthy"] is True and snap["breaches"] == []

    p0, *rest = snap["partitions"]
    assert p0["stream"] == stream and p0["length"] == 11
    assert 119 <= p0["first_entry_age_s"] < 200 and p0["last_entry_age_s"] < 60
    assert [(p["length"], p["groups"]) for p in rest] == [(0, [])] * 3
    groups = {g["name"]: g for g in p0["groups"]}
    analytics, workers = groups["analytics"], groups[GROUP]
    assert (analytics["lag"], analytics["lag_capped"], analytics["pending"]) == (5, False, 5)
    assert 119 <= analytics["oldest_pending_age_s"] < 200  # the old entry is still pending in a1
    assert {c["name"]: c["pending"] for c in analytics["consumers"]} == {"a1": 3, "a2": 2}
    assert all(c["idle_s"] < 60 for c in analytics["consumers"])
    assert (workers["lag"], workers["pending"], workers["oldest_pending_age_s"]) == (0, 0, None)
    assert [(c["name"], c["pending"]) for c in workers["consumers"]] == [("w", 0)]

    assert snap["dead"]["count"] == 2 and snap["dead"]["oldest_age_s"] < 60
    spool = snap["spool"]
    assert spool["dir"] == str(tmp_path / "edge-spool") and spool["exists"] is True
    assert (spool["entries"], spool["bytes"], spool["error"]) == (2, 150, None)
    assert spool["file_bytes"] > 0 and spool["free_bytes"] > 0 and 0 <= spool["oldest_age_s"] < 60
    t = snap["throughput"]
    assert (t["window_s"], t["in_events"], t["in_capped"], t["out_events"]) == (60, 10, False, 3)
    assert t["in_per_s"] == 10 / 60 and t["out_per_s"] == 3 / 60


async def test_crossed_thresholds_exit_3(procs: Procs, redis, pg, keys: Keys, tmp_path: Path):
    stream = await _plant(redis, pg, keys, tmp_path / "edge-spool")
    code, snap = await _status(procs, "--json", *GENEROUS, "--max-dead", "0")
    assert code == 3 and snap["healthy"] is False
    assert snap["breaches"] == [{"check": "dead", "subject": "dead letters", "value": 2, "limit": 0}]
    assert (snap["spool"]["entries"], snap["spool"]["bytes"]) == (0, 0)  # not this test's directory

    code, snap = await _status(procs, "--json", "--max-lag", "4", "--max-pending-age", "60", "--max-dead", "2")
    assert code == 3
    lag, pending_age = snap["breaches"]
    assert lag == {"check": "lag", "subject": f"{stream} analytics", "value": 5, "limit": 4}
    assert pending_age["check"] == "pending_age" and pending_age["subject"] == f"{stream} analytics"
    assert 119 <= pending_age["value"] < 200 and pending_age["limit"] == 60

    # the spool directory also comes from the environment
    code, text = await _status(procs, REFSTREAM_SPOOL_DIR=str(tmp_path / "edge-spool"))
    assert code == 3  # defaults: no dead letter tolerated
    assert "analytics" in text and "2 entries, 150 bytes" in text and "breach" in text


async def test_lag_without_xinfo_lag_counts_the_undelivered_entries(redis, keys: Keys):
    """Redis < 7 has no ``lag`` in XINFO GROUPS (and 7 reports nil after deletions)."""
    stream = keys.streams[1]
    ids = [await redis.xadd(stream, {FIELD: b"x"}) for _ in range(7)]
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "c", {stream: ">"}, count=3)
    (g,) = await redis.xinfo_groups(stream)
    last = (await redis.xinfo_stream(stream))["last-generated-id"]
    assert await status.group_lag(redis, stream, {**g, "lag": None}, last) == (4, False)
    await redis.xdel(stream, ids[5])  # a deleted entry is not waiting for anyone
    assert await status.group_lag(redis, stream, {**g, "lag": None}, last) == (3, False)
    await redis.xreadgroup("g", "c", {stream: ">"}, count=10)
    (g,) = await redis.xinfo_groups(stream)
    assert await status.group_lag(redis, stream, {**g, "lag": None}, last) == (0, False)
    spool = status.spool_usage(str(keys.prefix) + "/nowhere")
    assert (spool.exists, spool.entries) == (False, 0)
