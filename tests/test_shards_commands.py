"""The commands on several shards (docs/shards.md): the directory and a second shard, each
a database of its own, a workspace on each; real `refstream` processes. What a command
reads of everything it reads on every shard, naming each; what one workspace's command
writes goes to that workspace's shard; a moved workspace's old copy is counted once (where
it is now); and a shard that is down is said to be down, not a crash."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.wire import FIELD
from refstream.embedded import free_port

from ._procs import Procs, env_for, run_command
from ._world import BROWSER


def _at(days_ago: float, minutes: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago) + timedelta(minutes=minutes)).isoformat()


def _history(code: str, clicks: int, customer: str) -> str:
    rows: list[dict[str, Any]] = [
        {"type": "click", "id": f"c{i}", "timestamp": _at(2, i), "link": code, "ip": "203.0.113.7"}
        for i in range(clicks)
    ]
    rows.append({"type": "lead", "id": "l0", "timestamp": _at(2, 30), "click": "c0", "customer_id": customer})
    return "\n".join(orjson.dumps(r).decode() for r in rows) + "\n"


async def _json(settings: Settings, *args: str) -> tuple[int, Any, str]:
    code, out, err = await run_command(*args, "--json", env=env_for(settings))
    return code, orjson.loads(out) if out.strip() else None, err


async def _setup(procs: Procs, shard_url: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Workspace A on ``default`` (4 clicks and a lead imported), B on ``b`` (6 and a lead)."""
    await procs.cli("migrate")
    await procs.cli("shards", "add", "b", shard_url)
    a = await procs.cli("workspace", "create", "A", "--shard", "default")
    b = await procs.cli("workspace", "create", "B", "--shard", "b")
    for ws, code, n in ((a, "acode", 4), (b, "bcode", 6)):
        await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", code)
        path = tmp_path / f"{code}.ndjson"
        path.write_text(_history(code, n, f"cust-{code}"))
        done = await procs.cli("import", str(path), "--workspace", ws["workspace_id"])
        assert (done["stored"], done["shard"]) == (n + 1, ws["shard"]), done  # on its workspace's shard
    return a, b


async def test_the_commands_see_every_shard_and_name_it(
    settings: Settings, tmp_path: Path, two_shards: tuple[str, str], redis: Any
) -> None:
    directory_url, shard_url = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    directory = shard = None
    try:
        a, b = await _setup(procs, shard_url, tmp_path)
        directory, shard = await asyncpg.connect(directory_url), await asyncpg.connect(shard_url)
        assert await directory.fetchval("SELECT count(*) FROM events") == 5
        assert await shard.fetchval("SELECT count(*) FROM events") == 7

        keys = Keys(s.stream_prefix, s.partitions)
        for ws in (a, b):  # a dead letter of each
            e = Envelope(
                type=EventType.CLICK,
                dialect=Dialect.BIORE,
                payload={"code": "x"},
                ip="203.0.113.7",
                user_agent=BROWSER,
                workspace_id=ws["workspace_id"],
            )
            fields: dict[Any, Any] = {"id": "1-1", "error": "store: boom", "deliveries": 1, "stream": keys.streams[0]}
            fields.update({"at": int(time.time() * 1000), FIELD: wire.to_blob(e)})
            await redis.xadd(keys.dead, fields)
        await shard.execute("UPDATE links SET clicks = clicks + 5 WHERE code = 'bcode'")  # drift on b
        for conn in (directory, shard):  # stored within status's minute, however slow the machine
            await conn.execute("UPDATE events SET processed_at = now()")
        # the reads of everything, at once (each a process of its own)
        (_, snap, _), (code, found, _), (_, checked, _), (_, one, _), (_, letters, _) = await asyncio.gather(
            _json(s, "status"),
            _json(s, "reconcile"),
            _json(s, "commission", "check"),
            _json(s, "commission", "check", "--workspace", b["workspace_id"]),
            _json(s, "dead", "list"),
        )
        # status: each shard's figures, by name
        figures = {f["name"]: f for f in snap["shards"]}
        assert [f["name"] for f in snap["shards"]] == ["default", "b"]
        assert (figures["default"]["out_events"], figures["b"]["out_events"]) == (5, 7)
        assert (figures["default"]["workspaces"], figures["b"]["workspaces"]) == (1, 1)
        assert snap["throughput"]["out_events"] == 12 and snap["postgres_error"] is None
        # reconcile: the drift on b is found there, and named
        assert code == 1 and {(d["shard"], d["code"]) for d in found["drift"]} == {("b", "bcode")}, found
        assert [(x["shard"], x["drift"]) for x in found["shards"]] == [("default", 0), ("b", len(found["drift"]))]
        # commission check: every shard's ledger, or the workspace's shard's
        assert [x["shard"] for x in checked["shards"]] == ["default", "b"] and checked["differences"] == []
        assert [x["shard"] for x in one["shards"]] == ["b"], one
        # dead letters: each named by its workspace's shard
        assert [r["shard"] for r in letters] == ["default", "b"], letters

        # reconcile --fix repairs b's; erase: the customer's rows on the workspace's shard
        # (one after the other: an erasure rewrites the unique visitors a --fix beside it recounts)
        _, erased, err = await _json(s, "erase", "--customer", "cust-bcode", "--workspace", b["workspace_id"])
        code, fixed, _ = await _json(s, "reconcile", "--fix")
        assert code == 0 and fixed["fixed"] is True
        assert await shard.fetchval("SELECT clicks FROM links WHERE code = 'bcode'") == 6
        assert erased["shard"] == "b", err
        assert await shard.fetchval("SELECT count(*) FROM erasures") == 1
        assert await directory.fetchval("SELECT count(*) FROM erasures") == 0
        # --status and --sweep over every shard
        (code, listed, _), (_, swept, _), (_, shown, _) = await asyncio.gather(
            _json(s, "erase", "--status"),
            _json(s, "erase", "--sweep"),
            _json(s, "dead", "show", letters[1]["dead_id"]),
        )
        assert code == 0 and [x["shard"] for x in listed["shards"]] == ["default", "b"], listed
        assert set(swept["sweep"]) == {"default", "b"}, swept
        assert shown["shard"] == "b"

        # A moved to b: its frozen copy on default is counted nowhere twice
        moved = await procs.cli("workspace", "move", a["workspace_id"], "--to", "b", timeout=120)
        assert moved["state"] == "switched"
        await directory.execute("UPDATE links SET clicks = clicks + 9 WHERE code = 'acode'")
        for conn in (directory, shard):  # the old copy's rows too: within the minute, and not counted
            await conn.execute("UPDATE events SET processed_at = now()")
        await directory.execute(  # and an erasure pending there
            "INSERT INTO erasures (id, workspace_id, subject, requested_by, archive_due)"
            " VALUES (gen_random_uuid(), $1, '\\x00'::bytea, 'test', now())",
            a["workspace_id"],
        )
        (_, snap, _), (code, found, _), (_, listed, _) = await asyncio.gather(
            _json(s, "status"), _json(s, "reconcile", "--fix"), _json(s, "erase", "--status")
        )
        figures = {f["name"]: f for f in snap["shards"]}
        assert (figures["default"]["out_events"], figures["default"]["moved_away"]) == (0, 1), figures
        assert (figures["b"]["out_events"], figures["b"]["workspaces"]) == (12, 2), figures
        assert snap["throughput"]["out_events"] == 12
        # the old copy's counters are not recounted (nor fixed), its erasure not listed: read by no one
        assert code == 0 and found["drift"] == [], found
        assert await directory.fetchval("SELECT clicks FROM links WHERE code = 'acode'") == 13
        assert [p for p in listed["pending"] if p["workspace_id"] == a["workspace_id"]] == [], listed
    finally:
        procs.stop_all()
        for conn in (directory, shard):
            if conn is not None:
                await conn.close()


async def test_a_shard_that_is_down_is_said_to_be_down(
    settings: Settings, tmp_path: Path, two_shards: tuple[str, str]
) -> None:
    directory_url, _ = two_shards
    s = settings.model_copy(update={"database_url": directory_url})
    procs = Procs(s, tmp_path)
    await procs.cli("migrate")
    await procs.cli("workspace", "create", "A")
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    directory = await asyncpg.connect(directory_url)
    try:  # `shards add` would migrate it first: the row alone, as if its server went away
        await directory.execute("INSERT INTO shards (name, dsn) VALUES ('gone', $1)", f"postgresql://x@{gone}/refs")
    finally:
        await directory.close()

    code, snap, err = await _json(s, "status")
    assert code in (0, 3) and snap is not None, err
    figures = {f["name"]: f for f in snap["shards"]}
    assert figures["default"]["reachable"] is True and figures["default"]["workspaces"] == 1
    assert figures["gone"]["reachable"] is False and gone in figures["gone"]["error"], figures
    assert "shard gone" in snap["postgres_error"]
    code, text, _ = await run_command("status", env=env_for(s))
    assert "DOWN" in text, text

    # the commands that read everything go on with the others, name it, and exit 1
    code, found, err = await _json(s, "reconcile")
    assert code == 1 and found["drift"] == [] and "shard gone" in err, err
    assert [(x["shard"], x["reachable"]) for x in found["shards"]] == [("default", True), ("gone", False)]
    code, checked, err = await _json(s, "commission", "check")
    assert code == 1 and [x["reachable"] for x in checked["shards"]] == [True, False] and "shard gone" in err
    code, listed, err = await _json(s, "erase", "--status")
    assert code == 1 and [x["reachable"] for x in listed["shards"]] == [True, False] and "shard gone" in err
