"""``refstream workspace delete``: a workspace and every row it owns go, in every table that
has a workspace_id (the cascade's and the others'), its keys and links are refused by the
edge, and another workspace with the same customer id, email and visitor is untouched."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from ingest.contract.settings import Settings

from ._procs import env_for, run_command
from ._world import World, call, make_world
from .conftest import wait_for
from .test_seed_002_affitor import EXAMPLE as CLICK
from .test_seed_004_refport import lead_body


async def _traffic(edge: str, w: World, code: str) -> None:
    """A click and a lead on it, of the customer both workspaces name ``shared-1``."""
    click = {**CLICK, "affiliate_url": f"https://yoursite.com/pricing?aff={code}"}
    status, body, _ = await call("POST", f"{edge}/api/v1/track/click", json=click)
    assert status == 200, body
    lead = lead_body(body["click_id"], customerExternalId="shared-1", customerEmail="shared@example.com")
    status, body, _ = await call(
        "POST", f"{edge}/api/track/lead", json=lead, headers={"Authorization": f"Bearer {w.api_key}"}
    )
    assert status == 200, body


async def _rows(pg: asyncpg.Pool, ws: str) -> dict[str, int]:
    """Rows of the workspace, by table, in every table with a workspace_id column."""
    tables = [
        r["relname"]
        for r in await pg.fetch(
            "SELECT c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " WHERE a.attname = 'workspace_id' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " AND c.relnamespace = current_schema()::regnamespace"
        )
    ]
    out = {}
    for t in tables:
        n = await pg.fetchval(f'SELECT count(*) FROM "{t}" WHERE workspace_id = $1', uuid.UUID(ws))
        if n:
            out[t] = n
    return out


async def test_a_deleted_workspace_leaves_no_row_and_the_other_keeps_all_of_its(
    settings: Settings,
    pg: asyncpg.Pool,
    redis: Any,
    keys: Any,
    edge: str,
    drain: Callable[[], Awaitable[dict[str, int]]],
) -> None:
    a = await make_world(pg, redis, keys, code="GONE1", name="A")
    b = await make_world(pg, redis, keys, code="KEPT1", name="B")
    await _traffic(edge, a, "GONE1")
    await _traffic(edge, b, "KEPT1")
    await drain()
    before_a, before_b = await _rows(pg, a.workspace_id), await _rows(pg, b.workspace_id)
    assert {"events", "customers", "links", "api_keys"} <= before_a.keys(), before_a
    assert await pg.fetchval("SELECT count(*) FROM link_visitor_days WHERE link_id = $1", uuid.UUID(a.link["id"]))
    # an erasure in A of the id B shares: B's person stays (the deletion takes only A's ledger)
    code, out, err = await run_command(
        "erase", "--customer", "shared-1", "--workspace", a.workspace_id, "--json", env=env_for(settings)
    )
    assert code == 0, err

    code, out, err = await run_command("workspace", "delete", a.workspace_id, "--yes", "--json", env=env_for(settings))
    assert code == 0, err
    assert orjson.loads(out)["deleted"].get("events") == before_a["events"]
    assert await _rows(pg, a.workspace_id) == {}
    assert not await pg.fetchval("SELECT count(*) FROM link_visitor_days WHERE link_id = $1", uuid.UUID(a.link["id"]))
    assert await _rows(pg, b.workspace_id) == before_b
    kept = await pg.fetchrow(
        "SELECT email FROM customers WHERE workspace_id = $1 AND external_id = 'shared-1'", uuid.UUID(b.workspace_id)
    )
    assert kept is not None and kept["email"] == "shared@example.com"

    async def refused() -> bool:
        status, _, _ = await call(
            "POST", f"{edge}/api/track/lead", json=lead_body("clk_x"), headers={"Authorization": f"Bearer {a.api_key}"}
        )
        return status == 401

    await wait_for(refused, timeout=30, what="the deleted workspace's key refused")
    status, body, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={**CLICK, "affiliate_url": "https://yoursite.com/?aff=GONE1"}
    )
    assert (status, body.get("success")) == (400, False), body  # Affitor's answer for a code it does not know


async def test_deleting_a_workspace_that_is_not_there_says_so(settings: Settings) -> None:
    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        code, _, err = await run_command("workspace", "delete", missing, "--yes", env=env_for(settings))
        assert code == 1 and "not found" in err and "Traceback" not in err, err


async def test_a_delete_whose_directory_half_failed_is_finished_by_the_next(
    settings: Settings, pg: asyncpg.Pool
) -> None:
    """A delete commits on the workspace's shard, then frees its placement and its links'
    codes in the directory; with the directory away in between, the command fails, and the
    operator's next delete finds the workspace gone from its shard ("not found"). That
    second delete still does the directory's half: a code stays claimed for good otherwise
    (the generative test's ``tenant_wall``, seed 1574429589: a row left in workspace_shards)."""
    ws = uuid.uuid4()
    code = f"left-{ws.hex[:8]}"
    # what the failed delete left: the directory's rows of a workspace no shard holds
    await pg.execute("INSERT INTO workspace_shards (workspace_id, shard) VALUES ($1, 'default')", ws)
    await pg.execute("INSERT INTO link_codes (code, workspace_id) VALUES ($1, $2)", code, ws)
    code_, _, err = await run_command("workspace", "delete", str(ws), "--yes", env=env_for(settings))
    assert code_ == 1 and "not found" in err and "Traceback" not in err, err
    assert not await pg.fetchval("SELECT count(*) FROM workspace_shards WHERE workspace_id = $1", ws)
    assert not await pg.fetchval("SELECT count(*) FROM link_codes WHERE workspace_id = $1", ws)
