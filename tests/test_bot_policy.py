"""A workspace's bot policy: ``exclude`` (the default) counts a bot's click in bot_clicks
only; ``count`` counts it as a click too, as bio.re does. Set through the management API
or the CLI, applied by the worker, and kept by reconcile."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg
import orjson

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import admin
from workers.ops.reconcile import reconcile

from ._procs import env_for
from ._world import World, call, make_world

CURL = {"User-Agent": "curl/8.5.0"}


async def click(edge: str, code: str) -> None:
    status, body, _ = await call("POST", f"{edge}/api/v1/referral/click/{code}", headers=CURL)
    assert (status, body) == (200, {"success": True, "data": {"tracked": True}})


async def counters(pg: asyncpg.Pool, code: str) -> tuple[int, int, int]:
    row = await pg.fetchrow("SELECT clicks, unique_clicks, bot_clicks FROM links WHERE code = $1", code)
    return row["clicks"], row["unique_clicks"], row["bot_clicks"]


async def events(pg: asyncpg.Pool, code: str) -> list[tuple[bool, bool]]:
    rows = await pg.fetch(
        "SELECT e.is_bot, e.bot_counted FROM events e JOIN links l ON l.id = e.link_id WHERE l.code = $1"
        " ORDER BY e.event_id",
        code,
    )
    return [(r["is_bot"], r["bot_counted"]) for r in rows]


async def set_policy(settings: Settings, workspace_id: str, policy: str) -> dict[str, Any]:
    """``refstream workspace set-bot-policy ID POLICY --json``, as a process."""
    command = "from refstream.commands.workspace import set_bot_policy; set_bot_policy()"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        command,
        workspace_id,
        policy,
        "--json",
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    shown: dict[str, Any] = orjson.loads(out)
    return shown


async def test_a_curl_click_counts_as_a_click_under_count_and_apart_under_exclude(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys, drain: Any
) -> None:
    h = {"Authorization": f"Bearer {world.api_key}"}
    status, ws, _ = await call("PATCH", f"{edge}/v1/workspace", headers=h, json={"bot_policy": "count"})
    assert status == 200 and (ws["id"], ws["bot_policy"]) == (world.workspace_id, "count")
    other = await make_world(pg, redis, keys, code="OTHER", name="Other")  # the default policy
    assert await pg.fetchval("SELECT bot_policy FROM workspaces WHERE id = $1", other.workspace_id) == "exclude"

    await click(edge, "PARTNER123")
    await click(edge, "OTHER")
    await drain()

    assert await counters(pg, "PARTNER123") == (1, 1, 1)  # a click, a unique one, and a bot's
    assert await events(pg, "PARTNER123") == [(True, True)]
    assert await counters(pg, "OTHER") == (0, 0, 1)
    assert await events(pg, "OTHER") == [(True, False)]
    day = await pg.fetch("SELECT clicks, unique_clicks, bot_clicks FROM daily_stats ORDER BY clicks DESC")
    assert [tuple(r) for r in day] == [(1, 1, 1), (0, 0, 1)]
    assert await reconcile(pg, fix=False) == []
    assert await reconcile(pg, fix=True) == []  # and --fix keeps both
    assert await counters(pg, "PARTNER123") == (1, 1, 1) and await counters(pg, "OTHER") == (0, 0, 1)

    status, ev, _ = await call("GET", f"{edge}/v1/events?link_id={world.link['id']}", headers=h)
    assert status == 200 and (ev["data"][0]["is_bot"], ev["data"][0]["bot_counted"]) == (True, True)


async def test_a_policy_change_applies_from_then_on_and_reconcile_keeps_it(
    edge: str, world: World, pg: asyncpg.Pool, settings: Settings, drain: Any
) -> None:
    shown = await set_policy(settings, world.workspace_id, "count")
    assert (shown["id"], shown["bot_policy"]) == (world.workspace_id, "count")
    await click(edge, "PARTNER123")
    await drain()
    assert (await set_policy(settings, world.workspace_id, "exclude"))["bot_policy"] == "exclude"
    await click(edge, "PARTNER123")
    await drain()

    assert await counters(pg, "PARTNER123") == (1, 1, 2)  # the first click counted, the second not
    assert await events(pg, "PARTNER123") == [(True, True), (True, False)]
    # recounted from what was decided for each click, not from today's policy
    assert await reconcile(pg, fix=False) == []


async def test_the_policy_is_refused_outside_its_values_and_needs_write(
    edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    h = {"Authorization": f"Bearer {world.api_key}"}
    for body in ({"bot_policy": "sometimes"}, {"bot_filter": "count"}):
        status, out, _ = await call("PATCH", f"{edge}/v1/workspace", headers=h, json=body)
        assert (status, out["error"]) == (400, "invalid_request"), body
    status, ws, _ = await call("PATCH", f"{edge}/v1/workspace", headers=h, json={})
    assert (status, ws["bot_policy"]) == (200, "exclude")  # nothing given, nothing changed
    async with pg.acquire() as conn:
        reader = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    status, out, _ = await call(
        "PATCH",
        f"{edge}/v1/workspace",
        headers={"Authorization": f"Bearer {reader['api_key']}"},
        json={"bot_policy": "count"},
    )
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "write"})
    assert await pg.fetchval("SELECT bot_policy FROM workspaces WHERE id = $1", world.workspace_id) == "exclude"


def test_set_bot_policy_is_a_workspace_command() -> None:
    from refstream.cli import main
    from refstream.commands.workspace import set_bot_policy

    group: Any = main.commands["workspace"]
    assert group.commands.get("set-bot-policy") is set_bot_policy
