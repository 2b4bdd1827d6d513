"""The management API: create programs, affiliates and links, change and read them; scopes,
workspace isolation, affiliate keys; and the edge seeing link changes at once."""

from __future__ import annotations

import asyncpg

from ingest.contract.keys import Keys
from ingest.manage import admin

from ._world import World, call, make_world


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_create_program_affiliate_link_then_track_and_read(edge: str, world: World, pg: asyncpg.Pool, drain):
    h = auth(world.api_key)
    spring = {"name": "Spring", "cookie_window_days": 45, "attribution": "first_click"}
    status, program, _ = await call("POST", f"{edge}/v1/programs", headers=h, json=spring)
    assert status == 201 and program["cookie_window_days"] == 45 and program["attribution"] == "first_click"
    status, affiliate, _ = await call(
        "POST",
        f"{edge}/v1/affiliates",
        headers=h,
        json={"program_id": program["id"], "external_id": "jane", "name": "Jane", "email": "jane@example.com"},
    )
    assert status == 201 and affiliate["program_id"] == program["id"]
    status, link, _ = await call(
        "POST", f"{edge}/v1/links", headers=h, json={"affiliate_id": affiliate["id"], "url": "https://shop.test/spring"}
    )
    assert status == 201 and link["code"].startswith("JANE") and link["domain"] == "shop.test"
    assert link["program_id"] == program["id"] and link["status"] == "active"

    # the edge knows the new link at once, with its program's cookie window
    status, click, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={"affiliate_url": f"https://shop.test/?aff={link['code']}"}
    )
    assert status == 200 and click["cookie_window_days"] == 45
    lead = {
        "clickId": click["click_id"],
        "eventName": "Sign Up",
        "customerExternalId": "cust_9",
        "customerEmail": "c9@example.com",
    }
    assert (await call("POST", f"{edge}/api/track/lead", json=lead, headers=h))[0] == 200
    await drain()

    status, shown, _ = await call("GET", f"{edge}/v1/links/{link['id']}", headers=h)
    assert status == 200 and (shown["clicks"], shown["leads"], shown["conversions"]) == (1, 1, 0)
    assert shown["last_clicked_at"] is not None
    status, events, _ = await call("GET", f"{edge}/v1/events?link_id={link['id']}&type=lead&limit=10", headers=h)
    assert status == 200 and [e["type"] for e in events["data"]] == ["lead"]
    assert events["data"][0]["customer_external_id"] == "cust_9"
    status, all_events, _ = await call("GET", f"{edge}/v1/events?link_id={link['id']}", headers=h)
    assert [e["type"] for e in all_events["data"]] == ["lead", "click"]  # newest first
    status, customer, _ = await call("GET", f"{edge}/v1/customers/cust_9", headers=h)
    assert status == 200 and customer["status"] == "lead" and customer["email"] == "c9@example.com"
    assert customer["link_id"] == link["id"]


async def test_patch_link_deactivates_at_the_edge(edge: str, world: World, redis, keys: Keys):
    h = auth(world.api_key)
    status, link, _ = await call("PATCH", f"{edge}/v1/links/{world.link['id']}", headers=h, json={"status": "inactive"})
    assert status == 200 and link["status"] == "inactive"
    status, out, _ = await call(
        "POST", f"{edge}/api/v1/track/click", json={"affiliate_url": "https://x.test/?aff=PARTNER123"}
    )
    assert (status, out) == (200, {"success": False, "error": "Referral link is inactive"})
    status, link, _ = await call(
        "PATCH",
        f"{edge}/v1/links/{world.link['id']}",
        headers=h,
        json={"status": "active", "url": "https://new.test/landing"},
    )
    assert (link["status"], link["url"], link["domain"]) == ("active", "https://new.test/landing", "new.test")
    assert (await call("POST", f"{edge}/api/v1/track/click", json={"affiliate_url": "https://x.test/?aff=PARTNER123"}))[
        1
    ]["success"] is True


async def test_scopes_and_errors(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    async with pg.acquire() as conn:
        reader = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["read"])
    r = auth(reader["api_key"])
    status, out, _ = await call("POST", f"{edge}/v1/programs", headers=r, json={"name": "x"})
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "write"})
    assert (await call("GET", f"{edge}/v1/links/{world.link['id']}", headers=r))[0] == 200
    assert (await call("GET", f"{edge}/v1/links/{world.link['id']}"))[:2] == (401, {"error": "unauthorized"})
    h = auth(world.api_key)
    cases = [
        ("POST", "/v1/programs", {"name": ""}, 400, "invalid_request"),
        ("POST", "/v1/programs", {"name": "x", "cookie_window_days": 0}, 400, "invalid_request"),
        ("POST", "/v1/programs", {"name": "x", "extra": 1}, 400, "invalid_request"),
        ("POST", "/v1/affiliates", {"program_id": "nope", "external_id": "a"}, 404, "not_found"),
        ("POST", "/v1/affiliates", {"program_id": world.program_id, "external_id": "user_123"}, 409, "conflict"),
        ("POST", "/v1/links", {"affiliate_id": world.affiliate_id, "url": "ftp://x"}, 400, "invalid_request"),
        (
            "POST",
            "/v1/links",
            {"affiliate_id": world.affiliate_id, "url": "https://x.test", "code": "PARTNER123"},
            409,
            "conflict",
        ),
        ("PATCH", "/v1/links/not-a-uuid", {"status": "inactive"}, 404, "not_found"),
        ("PATCH", f"/v1/links/{world.link['id']}", {"status": "paused"}, 400, "invalid_request"),
        ("GET", "/v1/customers/nobody", None, 404, "not_found"),
    ]
    for method, path, body, status, code in cases:
        got, out, _ = await call(method, f"{edge}{path}", headers=h, json=body)
        assert (got, out["error"]) == (status, code), (method, path, body, out)
    got, out, _ = await call("POST", f"{edge}/v1/programs", headers=h, data=b"{bad")
    assert (got, out["error"]) == (400, "invalid_json")
    for query in ("type=signup", "limit=0", "limit=x"):
        assert (await call("GET", f"{edge}/v1/events?{query}", headers=h))[0] == 400


async def test_another_workspaces_objects_are_not_found(edge: str, world: World, pg, redis, keys: Keys):
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    h = auth(world.api_key)
    assert (await call("GET", f"{edge}/v1/links/{other.link['id']}", headers=h))[0] == 404
    assert (await call("PATCH", f"{edge}/v1/links/{other.link['id']}", headers=h, json={"status": "inactive"}))[
        0
    ] == 404
    assert (
        await call(
            "POST", f"{edge}/v1/links", headers=h, json={"affiliate_id": other.affiliate_id, "url": "https://x.test"}
        )
    )[0] == 404
    assert (
        await call(
            "POST", f"{edge}/v1/affiliates", headers=h, json={"program_id": other.program_id, "external_id": "z"}
        )
    )[0] == 404
    assert await pg.fetchval("SELECT status FROM links WHERE code = 'THEIRS'") == "active"


async def test_affiliate_keys_see_only_their_own(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys, drain):
    async with pg.acquire() as conn:
        second = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id) VALUES ($1, $2, 'other') RETURNING id",
            world.workspace_id,
            world.program_id,
        )
        await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=world.workspace_id,
            code="NOTMINE",
            program_id=world.program_id,
            affiliate_id=str(second),
        )
        mine = await admin.create_key(
            conn, redis, keys, workspace_id=world.workspace_id, scopes=["*"], affiliate_id=world.affiliate_id
        )
    for code in ("PARTNER123", "PARTNER123", "NOTMINE"):
        await call("POST", f"{edge}/api/v1/referral/click/{code}")
    await drain()
    a = auth(mine["api_key"])
    status, out, _ = await call("GET", f"{edge}/v1/affiliate/links", headers=a)
    assert status == 200 and [link["code"] for link in out["data"]] == ["PARTNER123"]
    status, stats, _ = await call("GET", f"{edge}/v1/affiliate/stats", headers=a)
    assert status == 200 and (stats["links"], stats["clicks"]) == (1, 2)
    assert sum(d["clicks"] for d in stats["daily"]) == 2
    # read-only, and only the affiliate routes
    assert (await call("GET", f"{edge}/v1/links/{world.link['id']}", headers=a))[0] == 403
    assert (await call("PATCH", f"{edge}/v1/links/{world.link['id']}", headers=a, json={"status": "inactive"}))[
        0
    ] == 403
    assert (await call("GET", f"{edge}/v1/affiliate/links", headers=auth(world.api_key)))[0] == 403


async def test_keys_through_the_api(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    from .conftest import wait_for

    h = auth(world.api_key)
    status, created, _ = await call("POST", f"{edge}/v1/keys", headers=h, json={"scopes": ["track"], "name": "ci"})
    assert status == 201 and created["scopes"] == ["track"] and created["api_key"].startswith(created["prefix"])
    assert await pg.fetchval("SELECT count(*) FROM api_keys WHERE prefix = $1", created["prefix"]) == 1
    tracker = auth(created["api_key"])
    assert (await call("POST", f"{edge}/v1/track/click", headers=tracker, json={"ref": "PARTNER123"}))[0] == 200
    # a key without "*" can neither mint keys nor revoke them
    status, out, _ = await call("POST", f"{edge}/v1/keys", headers=tracker, json={"scopes": ["*"]})
    assert (status, out) == (403, {"error": "insufficient_scope", "need": "*"})
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    theirs = (await call("POST", f"{edge}/v1/keys", headers=auth(other.api_key), json={}))[1]
    assert (await call("DELETE", f"{edge}/v1/keys/{theirs['prefix']}", headers=h))[0] == 404
    assert (await call("DELETE", f"{edge}/v1/keys/{created['prefix']}", headers=h))[:2] == (
        200,
        {"revoked": created["prefix"]},
    )

    async def refused() -> bool:
        got = await call("POST", f"{edge}/v1/track/click", headers=tracker, json={"ref": "PARTNER123"})
        return got[0] == 401

    await wait_for(refused, timeout=10, what="the revoked key to be refused")
    status, aff, _ = await call("POST", f"{edge}/v1/keys", headers=h, json={"affiliate_id": world.affiliate_id})
    assert status == 201 and aff["kind"] == "affiliate" and aff["scopes"] == ["read"]
    assert (await call("POST", f"{edge}/v1/keys", headers=h, json={"scopes": ["root"]}))[0] == 400
