"""Every list the management API answers is bounded (issue 64, 7): each takes ``?limit=``
(1 to 500; 400 past it) and answers at most that many; a list that can grow without bound
with its workspace (suppressions, an affiliate's links, conversions, commissions, payouts)
comes by page, its ``next`` the following page's ``before``. The lists are found from the
OpenAPI document: a new one without a limit fails here."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.edge.documented import Op
from ingest.manage import admin
from ingest.manage.routes._guard import LIMIT

from ._openapi import OPERATIONS
from ._world import World, call


def _is_list(op: Op) -> bool:
    ok = op.responses.get(200)
    fields = getattr(ok, "model_fields", {})
    return op.method == "get" and "data" in fields and getattr(fields["data"].annotation, "__origin__", None) is list


LISTS = sorted(op.path for op in OPERATIONS if _is_list(op))
PAGED = {op.path for op in OPERATIONS if _is_list(op) and "next" in op.responses[200].model_fields}  # type: ignore[union-attr]
# the recent events and a webhook's newest deliveries: a window of the newest, by ?limit=
WINDOWS = {"/v1/events", "/v1/webhooks/{id}/deliveries"}


def test_the_lists_are_found() -> None:
    assert {"/v1/suppressions", "/v1/affiliate/links", "/v1/conversions", "/v1/events"} <= set(LISTS)


@pytest.mark.parametrize("path", LISTS)
def test_each_list_is_documented_with_a_limit_and_by_page(path: str) -> None:
    (op,) = [op for op in OPERATIONS if op.path == path and op.method == "get"]
    assert op.query.get("limit") == LIMIT and LIMIT.get("maximum") == 500, op.query
    if path not in WINDOWS:
        assert path in PAGED and "before" in op.query, f"{path} answers every row at once"


async def _filled(edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys) -> dict[str, Any]:
    """Three of what each cheap list holds; the keys and ids the paths need."""
    workspace = {"Authorization": f"Bearer {world.api_key}"}
    async with pg.acquire() as conn:
        for n in range(2):  # three links of the affiliate, PARTNER123 with them
            await admin.create_link(
                conn,
                redis,
                keys,
                workspace_id=world.workspace_id,
                code=f"MORE{n}",
                url="https://yoursite.com/",
                program_id=world.program_id,
                affiliate_id=world.affiliate_id,
            )
        mine = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["*"], affiliate_id=world.affiliate_id
        )
    for n in range(3):
        status, _, _ = await call(
            "POST", f"{edge}/v1/suppressions", json={"kind": "visitor", "value": f"v{n}"}, headers=workspace
        )
        assert status == 201
    status, hook, _ = await call(
        "POST",
        f"{edge}/v1/webhooks",
        json={"url": "https://example.com/hook", "events": ["lead.created"]},
        headers=workspace,
    )
    assert status == 201, hook
    return {"workspace": workspace, "affiliate": {"Authorization": f"Bearer {mine['api_key']}"}, "hook": hook["id"]}


FILLED = {"/v1/suppressions": 3, "/v1/affiliate/links": 3}


@pytest.mark.parametrize("path", LISTS)
async def test_each_list_answers_at_most_its_limit_and_pages_through_the_rest(
    path: str, edge: str, world: World, pg: asyncpg.Pool, redis: Any, keys: Keys
) -> None:
    made = await _filled(edge, world, pg, redis, keys)
    headers = made["affiliate" if path.startswith("/v1/affiliate/") else "workspace"]
    url = f"{edge}{path.replace('{id}', made['hook'])}"
    status, out, _ = await call("GET", f"{url}?limit=501", headers=headers)
    assert status == 400 and out["error"] == "invalid_request", (status, out)
    seen: list[Any] = []
    at = f"{url}?limit=1"
    for _ in range(10):
        status, page, _ = await call("GET", at, headers=headers)
        assert status == 200, page
        assert len(page["data"]) <= 1
        seen += page["data"]
        if path not in PAGED or page["next"] is None:
            break
        at = f"{url}?limit=1&before={page['next']}"
    assert len(seen) == (FILLED.get(path, 0) if path in PAGED else min(1, FILLED.get(path, 0)))
    if path in FILLED:
        assert len({str(item) for item in seen}) == FILLED[path]  # each once
