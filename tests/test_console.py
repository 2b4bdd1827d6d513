"""``refstream console``: who may read what (the operator's token, a tenant's read key, one
refusal for every wrong key), the pipeline's samples, the tail within 2 s, a dead letter
retried once, a dry run counting what the command line counts, one replay at a time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from refstream.cli import main
from refstream.console import access, tail
from refstream.console.access import REFUSAL
from workers.ops import replay

from ._console import TOKEN, affitor_click, call, running
from ._procs import Procs, free_port
from ._world import BROWSER, World, make_world
from .conftest import wait_for

OPERATOR_ROUTES = ("/api/pipeline", "/api/tail", "/api/dead", "/api/erasures", "/api/replay")
OPERATOR_ACTIONS = ("/api/dead/count", "/api/dead/retry", "/api/dead/drop", "/api/replay/dry-run", "/api/replay/run")


async def _raw(base: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(base + path, headers=headers) as r:
        return r.status, await r.read()


async def _read_key(pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, scopes: list[str]) -> dict[str, Any]:
    async with pg.acquire() as conn:
        return await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=scopes)


async def test_no_key_a_wrong_key_a_revoked_and_an_expired_key_are_refused_alike(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
) -> None:
    read = await _read_key(pg, redis, keys, world, ["read"])
    track = await _read_key(pg, redis, keys, world, ["track"])
    revoked = await _read_key(pg, redis, keys, world, ["read"])
    async with pg.acquire() as conn:
        expiring = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"], expires_in_s=10
        )
    async with running(settings) as base:
        # a key that worked is refused from the request after its revocation
        assert (await call(base, "/api/tenant/links", revoked["api_key"]))[0] == 200
        async with pg.acquire() as conn:
            await admin.revoke_key(conn, redis, keys, revoked["prefix"])
        # and one that worked is refused once its expiry passes, never revoked
        assert (await call(base, "/api/tenant/links", expiring["api_key"]))[0] == 200

        async def expired() -> bool:
            return await _raw(base, "/api/tenant/links", {"Authorization": f"Bearer {expiring['api_key']}"}) == (
                401,
                REFUSAL,
            )

        await wait_for(expired, timeout=30, what="the expired key's refusal")
        assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", expiring["prefix"]) is None
        wrong = {
            "no key": {},
            "a wrong token": {"Authorization": f"Bearer {TOKEN}x"},
            "a token of another scheme": {"Authorization": f"Basic {TOKEN}"},
            "a workspace key": {"Authorization": f"Bearer {read['api_key']}"},
        }
        for path in OPERATOR_ROUTES:
            for why, headers in wrong.items():
                assert await _raw(base, path, headers) == (401, REFUSAL), (path, why)
            assert (await _raw(base, path, {"Authorization": f"Bearer {TOKEN}"}))[0] == 200, path
        for path in OPERATOR_ACTIONS:
            for why, headers in wrong.items():
                async with aiohttp.ClientSession() as http, http.post(base + path, json={}, headers=headers) as r:
                    assert (r.status, await r.read()) == (401, REFUSAL), (path, why)
        tenant_wrong = {
            "no key": {},
            "a wrong key": {"Authorization": f"Bearer {read['api_key']}x"},
            "a revoked key": {"Authorization": f"Bearer {revoked['api_key']}"},
            "an expired key": {"Authorization": f"Bearer {expiring['api_key']}"},
            "a key without read": {"Authorization": f"Bearer {track['api_key']}"},
            "the operator's token": {"Authorization": f"Bearer {TOKEN}"},
        }
        for why, headers in tenant_wrong.items():
            assert await _raw(base, "/api/tenant/links", headers) == (401, REFUSAL), why
        status, body = await call(base, "/api/tenant/links", read["api_key"])
        assert status == 200 and body["workspace_id"] == world.workspace_id
        # a key in the URL is no key
        assert (await _raw(base, f"/api/pipeline?token={TOKEN}", {}))[0] == 401


async def test_pages_and_answers_carry_the_strict_policy(settings: Settings, pg: asyncpg.Pool, redis: Any) -> None:
    async with running(settings) as base, aiohttp.ClientSession() as http:
        for path in ("/", "/pipeline", "/tail", "/dead", "/replay", "/erasures", "/links", "/static/charts.js"):
            async with http.get(base + path) as r:
                assert r.status == 200, path
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
                assert "unsafe-inline" not in csp and r.headers["X-Content-Type-Options"] == "nosniff"
                text = await r.text()
                if path.endswith(".js"):
                    assert "innerHTML" not in text
                else:
                    assert "<script>" not in text and " on" + "click=" not in text  # no inline script
        async with http.get(base + "/api/pipeline") as r:
            assert r.status == 401 and "Content-Security-Policy" in r.headers


def test_a_console_off_loopback_without_a_token_refuses_to_start() -> None:
    with pytest.raises(access.OpenConsole):
        access.check_bind("0.0.0.0", None)
    access.check_bind("0.0.0.0", TOKEN)
    access.check_bind("127.0.0.1", None)
    access.check_bind("::1", None)
    assert Settings(console_token="").console_token is None  # compose's empty default: no token
    with pytest.raises(ValidationError):
        Settings(console_token="short")
    env = {"REFSTREAM_CONSOLE_TOKEN": None}
    for host in ("0.0.0.0", "192.0.2.1", "console.example"):
        result = CliRunner().invoke(main, ["console", "--host", host, "--port", str(free_port())], env=env)
        assert result.exit_code == 1, result.output
        assert "needs REFSTREAM_CONSOLE_TOKEN" in result.output


async def test_a_tenant_key_sees_only_its_own_workspace(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str, drain: Any
) -> None:
    other = await make_world(pg, redis, keys, code="OTHER9", name="Other")
    for code in ("PARTNER123", "OTHER9", "OTHER9"):
        await affitor_click(edge, code)
    await drain()
    mine = await _read_key(pg, redis, keys, world, ["read"])
    theirs = await _read_key(pg, redis, keys, other, ["read"])
    async with running(settings) as base:
        _, body = await call(base, "/api/tenant/links", mine["api_key"])
        assert body["workspace_id"] == world.workspace_id
        assert {d["link"] for d in body["days"]} == {"PARTNER123"} and body["days"][0]["clicks"] == 1
        _, body = await call(base, "/api/tenant/links", theirs["api_key"])
        assert {d["link"] for d in body["days"]} == {"OTHER9"} and body["days"][0]["clicks"] == 2
        # no parameter widens it: the workspace is the key's
        _, body = await call(base, f"/api/tenant/links?workspace_id={world.workspace_id}", theirs["api_key"])
        assert body["workspace_id"] == other.workspace_id


async def test_the_tail_shows_an_event_within_2_s_of_its_request(
    settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str, drain: Any
) -> None:
    async with running(settings) as base:
        sent = time.monotonic()
        await affitor_click(edge, "PARTNER123")

        async def seen() -> dict[str, Any] | None:
            _, body = await call(base, "/api/tail?link=PARTNER123&type=click")
            return next((row for row in body["accepted"]), None)

        row = await wait_for(seen, timeout=2, what="the click in the tail")
        assert time.monotonic() - sent < 2
        assert row["dialect"] == "affitor" and row["workspace"] == world.workspace_id and row["type"] == "click"
        # filters that match nothing show nothing
        _, body = await call(base, "/api/tail?dialect=biore")
        assert body["accepted"] == []
        assert (await call(base, "/api/tail?workspace=nope"))[0] == 400
        # and as the worker stores it
        await drain()
        _, body = await call(base, "/api/tail?link=PARTNER123")
        assert [r["stage"] for r in body["outcomes"]] == ["stored"]
        # read without a consumer group: the workers' groups are all there is
        for stream in (Keys(settings.stream_prefix, settings.partitions)).streams:
            groups = {g["name"] for g in await redis.xinfo_groups(stream)} if await redis.exists(stream) else set()
            assert groups <= {b"workers", b"archive"}


def _click(code: str, workspace_id: str) -> Envelope:
    return Envelope(
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        payload={"code": code},
        workspace_id=workspace_id,
        ip="203.0.113.7",
        user_agent=BROWSER,
    )


async def test_a_dead_letter_retried_through_the_console_is_stored_once(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, drain: Any
) -> None:
    event = _click("PARTNER123", world.workspace_id)
    fields: dict[Any, Any] = {
        **wire.to_entry_dict(event),
        "stream": keys.stream_for("PARTNER123"),
        "id": "1-1",
        "error": "store: x",
    }
    await redis.xadd(keys.dead, fields)
    await redis.xadd(keys.dead, {"id": "1-2", "error": "decode: junk", "e": b"\xff"})
    async with running(settings) as base:
        _, listed = await call(base, "/api/dead")
        assert listed["by_reason"] == {"store": 1, "decode": 1}
        assert (await call(base, "/api/dead/count", body={"code": "PARTNER123"}))[1] == {"matched": 1}
        _, done = await call(base, "/api/dead/retry", body={"filter": {"code": "PARTNER123"}})
        assert done == {"matched": 1, "requeued": 1, "missing": 0, "skipped": {}}
        await drain()
        _, again = await call(base, "/api/dead/retry", body={"filter": {"code": "PARTNER123"}})
        assert again["matched"] == 0
        await drain()
    assert await pg.fetchval("SELECT count(*) FROM events WHERE event_id = $1", event.event_id) == 1
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 1
    assert await redis.xlen(keys.dead) == 1  # the undecodable one stays


async def test_two_retries_of_one_letter_at_once_queue_it_once(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World
) -> None:
    event = _click("PARTNER123", world.workspace_id)
    fields: dict[Any, Any] = {**wire.to_entry_dict(event), "stream": keys.stream_for("PARTNER123"), "error": "store: x"}
    dead_id = (await redis.xadd(keys.dead, fields)).decode()
    async with running(settings) as base:
        answers = await asyncio.gather(*(call(base, "/api/dead/retry", body={"dead_id": dead_id}) for _ in range(4)))
        assert sorted((a["requeued"], a["missing"]) for _, a in answers) == [(0, 1), (0, 1), (0, 1), (1, 0)], answers
        assert all(a["dead_id"] == dead_id for _, a in answers)
        assert (await call(base, "/api/dead/drop", body={"dead_id": dead_id}))[1]["missing"] == 1
        assert (await call(base, "/api/dead/drop", body={"dead_id": 7}))[0] == 400
    entries = await redis.xrange(keys.stream_for("PARTNER123"))
    assert [wire.from_entry(f).event_id for _, f in entries].count(event.event_id) == 1


async def _finished(base: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        run = (await call(base, "/api/replay"))[1]["run"]
        return run if run and run["state"] != "running" else None

    run: dict[str, Any] = await wait_for(done, timeout=60, what="the replay to end")
    return run


async def test_a_dry_run_counts_what_the_command_line_counts(
    settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str, drain: Any, procs: Procs
) -> None:
    for _ in range(3):
        await affitor_click(edge, "PARTNER123")
    await drain()
    await pg.execute("DELETE FROM events WHERE event_id IN (SELECT event_id FROM events LIMIT 1)")
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    cli = await procs.cli("replay", "--dry-run", "--since", since)
    async with running(settings) as base:
        status, run = await call(base, "/api/replay/dry-run", body={"since": since})
        assert status == 202 and run["kind"] == "dry_run"
        run = await _finished(base)
        assert run["state"] == "done", run
        assert run["result"]["totals"] == cli["totals"] and cli["totals"]["new"] == 1
        assert (await call(base, "/api/replay/dry-run", body={"since": "yesterday-ish"}))[0] == 400


async def test_one_replay_at_a_time_and_the_second_is_told_which_runs(
    settings: Settings, pg: asyncpg.Pool, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    real = replay.plan

    async def held(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(replay, "plan", held)  # the console calls it through its module
    async with running(settings) as base:
        _, first = await call(base, "/api/replay/dry-run", body={"since": "1h"})
        status, refused = await call(base, "/api/replay/run", body={"since": "2h"})
        assert status == 409 and refused["running"]["id"] == first["id"] and refused["running"]["kind"] == "dry_run"
        release.set()
        assert (await _finished(base))["id"] == first["id"]
        assert (await call(base, "/api/replay/dry-run", body={"since": "1h"}))[0] == 202


async def test_the_pipeline_is_sampled_every_2_s(
    settings: Settings, pg: asyncpg.Pool, redis: Any, world: World, edge: str
) -> None:
    async with running(settings) as base:
        await affitor_click(edge, "PARTNER123")  # before the first sample: it starts the count

        async def two() -> list[dict[str, Any]] | None:
            samples = (await call(base, "/api/pipeline"))[1]["samples"]
            return samples if len(samples) >= 2 else None

        await wait_for(two, timeout=10, what="two samples")
        await affitor_click(edge, "PARTNER123")

        async def counted() -> list[dict[str, Any]] | None:
            samples = (await call(base, "/api/pipeline"))[1]["samples"]
            return samples if any(s.get("accepted", {}).get("affitor") for s in samples) else None

        samples = await wait_for(counted, timeout=10, what="the click in a sample")
        last = samples[-1]
        for chart in ("accepted", "stored", "lag", "pending_age", "live", "spool", "memory", "reachable", "dead"):
            assert chart in last, chart
        assert last["reachable"] == {"redis": 1, "postgres": 1}
        assert 1.5 < (samples[-1]["at_ms"] - samples[-2]["at_ms"]) / 1000 < 3
        newer = (await call(base, f"/api/pipeline?since={last['at_ms']}"))[1]["samples"]
        assert all(s["at_ms"] > last["at_ms"] for s in newer)


async def test_open_tails_polling_one_filter_share_one_read(
    settings: Settings, pg: asyncpg.Pool, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    real = tail.accepted

    async def counted(*args: Any) -> list[dict[str, Any]]:
        reads.append(args[2])
        return await real(*args)

    monkeypatch.setattr(tail, "accepted", counted)
    async with running(settings) as base:
        answers = await asyncio.gather(*(call(base, "/api/tail?type=click") for _ in range(10)))
        assert [status for status, _ in answers] == [200] * 10 and len(reads) == 1
        await call(base, "/api/tail?type=lead")
        assert len(reads) == 2
        await asyncio.sleep(0.3)
        await call(base, "/api/tail?type=click")
        assert len(reads) == 3


async def test_the_console_starts_and_charts_while_postgres_is_down(settings: Settings, redis: Any) -> None:
    down = settings.model_copy(update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    async with running(down) as base:

        async def sampled() -> dict[str, Any] | None:
            samples = (await call(base, "/api/pipeline"))[1]["samples"]
            return samples[-1] if samples else None

        last = await wait_for(sampled, timeout=10, what="a sample")
        assert last["reachable"] == {"redis": 1, "postgres": 0} and "lag" in last
        status, body = await call(base, "/api/erasures")
        assert status == 503 and body["error"] == "unavailable"


async def test_the_tail_says_why_an_event_did_not_count(
    settings: Settings, pg: asyncpg.Pool, redis: Any, keys: Keys, world: World, edge: str, drain: Any
) -> None:
    body = {"affiliate_url": "https://yoursite.com/pricing?aff=PARTNER123"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{edge}/api/v1/track/click", json=body, headers={"User-Agent": "curl/8.5.0"}) as r,
    ):
        assert r.status == 200
    # an entry for a code no link has (a link deleted after its click was accepted)
    await redis.xadd(keys.stream_for("GONE1"), wire.to_entry_dict(_click("GONE1", world.workspace_id)))
    await drain()
    async with running(settings) as base:
        _, answer = await call(base, "/api/tail")
    reasons = {(row["link"], row["stage"], row["reason"]) for row in answer["outcomes"]}
    assert ("PARTNER123", "dropped", "bot") in reasons
    assert ("GONE1", "dropped", "unknown_code") in reasons  # no link: the code from its stream entry


async def test_without_a_token_the_loopback_console_is_the_operators(settings: Settings, redis: Any) -> None:
    async with running(settings, token=None) as base:
        assert await call(base, "/api/access", None) == (200, {"operator_token": False})
        assert (await call(base, "/api/pipeline", None))[0] == 200
    async with running(settings) as base:
        assert await call(base, "/api/access", None) == (200, {"operator_token": True})
