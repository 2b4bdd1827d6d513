"""API keys: shown once, stored as sha256, revocable within seconds, never in the logs;
workspaces never see each other; the trusted-proxy rule for client addresses."""

from __future__ import annotations

import hashlib
import time
from ipaddress import ip_network

import asyncpg
import pytest

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings

from ._procs import Procs
from ._world import World, call, make_world, start_edge
from .conftest import wait_for
from .test_seed_002_affitor import EXAMPLE as CLICK

EXPIRES_IN_S = 15  # long enough for a loaded machine's first request, short enough to wait out


async def test_keys_are_hashed_revocable_and_never_logged(procs: Procs, pg: asyncpg.Pool, redis, keys: Keys):
    ws = await procs.cli("workspace", "create", "Acme")
    created = await procs.cli("keys", "create", "--workspace", ws["workspace_id"], "--scopes", "track,read")
    secret = created["api_key"]
    assert created["scopes"] == ["read", "track"] and secret.startswith(created["prefix"])
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    edge = await procs.start_edge()

    status, _, _ = await call(
        "POST", f"{edge}/v1/track/click", json={"ref": "alice"}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert status == 200

    row = await pg.fetchrow("SELECT * FROM api_keys WHERE prefix = $1", created["prefix"])
    assert bytes(row["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    dump = " ".join(str(v) for r in await pg.fetch("SELECT * FROM api_keys") for v in r.values())
    assert secret not in dump and ws["api_key"] not in dump
    strings = [await redis.get(k) async for k in redis.scan_iter(match=f"{keys.prefix}:*", _type="string")]
    assert strings and not any(secret.encode() in v for v in strings if v)

    await procs.cli("keys", "revoke", created["prefix"])

    async def refused() -> bool:
        got = await call(
            "POST", f"{edge}/v1/track/click", json={"ref": "alice"}, headers={"Authorization": f"Bearer {secret}"}
        )
        return got[:2] == (401, {"error": "unauthorized"})

    await wait_for(refused, timeout=30, what="the revoked key to be refused")  # the edge caches keys for 5 s
    procs.stop_all()
    logs = procs.logs()
    assert "track/click" in logs  # the edge did log these requests ...
    assert secret not in logs and ws["api_key"] not in logs  # ... and never a key


async def test_one_workspace_never_sees_another(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys, drain):
    other = await make_world(pg, redis, keys, code="THEIRS", name="Other")
    mine = {"Authorization": f"Bearer {world.api_key}"}
    assert (await call("POST", f"{edge}/v1/track/click", json={"ref": "THEIRS"}, headers=mine))[:2] == (
        404,
        {"error": "link_not_found"},
    )
    theirs = (
        await call("POST", f"{edge}/api/v1/track/click", json={**CLICK, "affiliate_url": "https://x.test/?aff=THEIRS"})
    )[1]["click_id"]
    lead = {"clickId": theirs, "eventName": "Sign Up", "customerExternalId": "u1"}
    status, out, _ = await call("POST", f"{edge}/api/track/lead", json=lead, headers=mine)
    assert (status, out["error"]["code"]) == (400, "INVALID_CLICK_ID")
    await drain()
    # only the other workspace's public click counted, on its own link
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'THEIRS'") == 1
    assert await pg.fetchval("SELECT clicks + leads FROM links WHERE code = 'PARTNER123'") == 0
    assert await pg.fetchval("SELECT count(*) FROM events WHERE workspace_id = $1", world.workspace_id) == 0
    assert other.workspace_id != world.workspace_id


async def _hammer(edge: str, n: int, xff: list[str]) -> list[int]:
    return [
        (
            await call(
                "POST", f"{edge}/api/v1/referral/click/PARTNER123", headers={"X-Forwarded-For": xff[i % len(xff)]}
            )
        )[0]
        for i in range(n)
    ]


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(edge: str, world: World):
    statuses = await _hammer(edge, 61, [f"203.0.113.{i}" for i in range(61)])
    assert statuses[:60] == [200] * 60 and statuses[60] == 429  # all counted against 127.0.0.1


async def test_forwarded_for_from_a_trusted_proxy_is_the_client(settings: Settings, world: World):
    runner, edge = await start_edge(settings.model_copy(update={"trusted_proxies": [ip_network("127.0.0.1/32")]}))
    try:
        # the right-most untrusted address is the client: what a client wrote before it is ignored
        statuses = await _hammer(edge, 61, ["198.51.100.1, 203.0.113.7", "10.9.9.9, 203.0.113.7"])
        assert statuses[:60] == [200] * 60 and statuses[60] == 429
        assert (await _hammer(edge, 1, ["203.0.113.8"])) == [200]  # another client behind the proxy
    finally:
        await runner.cleanup()


def test_secret_key_prints_a_key_that_encrypts_and_decrypts() -> None:
    """`refstream secret-key` works from anywhere (not only the repository root)."""
    import subprocess
    import tempfile

    from ingest.ledger import secretbox

    from ._procs import REFSTREAM

    with tempfile.TemporaryDirectory() as elsewhere:
        out = subprocess.run([REFSTREAM, "secret-key"], capture_output=True, cwd=elsewhere, timeout=60, check=True)
    key = out.stdout.decode().strip()
    assert secretbox.decrypt(key, secretbox.encrypt(key, "whsec_x")) == "whsec_x"
    again = subprocess.run([REFSTREAM, "secret-key"], capture_output=True, timeout=60, check=True)
    assert again.stdout.decode().strip() != key


async def test_a_revocation_redis_cannot_take_is_no_revocation(pg: asyncpg.Pool, redis, keys: Keys):
    """Redis away when a key is revoked: the revocation is refused as a whole (the key's
    Redis entry, which lives a day, would otherwise keep letting it in), and its retry
    revokes it, the entry with it."""
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from ingest.edge import auth
    from ingest.manage import admin
    from refstream.embedded import free_port

    world = await make_world(pg, redis, keys, code="REVOKE1")
    async with pg.acquire() as conn:
        made = await admin.create_key(conn, redis, keys, workspace_id=world.workspace_id, scopes=["track"])
    digest = hashlib.sha256(made["api_key"].encode()).digest()
    entry = keys.apikey(digest.hex())
    assert await redis.get(entry) not in (None, auth._UNKNOWN)  # the key's entry: it lets the key in
    away = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        async with pg.acquire() as conn:
            with pytest.raises(RedisConnectionError):
                await admin.revoke_key(conn, away, keys, made["prefix"])
    finally:
        await away.aclose()
    assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", made["prefix"]) is None
    async with pg.acquire() as conn:
        assert await admin.revoke_key(conn, redis, keys, made["prefix"]) == {"revoked": made["prefix"]}
    assert await redis.get(entry) == auth._UNKNOWN
    assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", made["prefix"]) is not None


async def test_a_key_made_to_expire_is_refused_from_then_on_by_a_running_edge(
    procs: Procs, pg: asyncpg.Pool, redis, keys: Keys
):
    """A key made to expire works, then, with nothing revoked and the edge's caches warm,
    every request after its expiry is refused as an unknown key is; an expiry not in the
    future is refused at creation, by ``keys create --expires-in`` and by ``POST /v1/keys``."""
    from ingest.manage import admin

    ws = await procs.cli("workspace", "create", "Expiring")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "expiring")
    # keys held in the edge's memory for ten minutes: only the expiry itself can refuse it
    edge = await procs.start_edge(REFSTREAM_KEY_CACHE_S="600")
    made_at = time.monotonic()
    async with pg.acquire() as conn:  # made here, the edge already up: its first request is seconds early
        made = await admin.create_key(
            conn, redis, keys, workspace_id=ws["workspace_id"], scopes=["track"], expires_in_s=EXPIRES_IN_S
        )
    assert made["expires_at"] is not None

    async def click(secret: str) -> tuple[int, object]:
        got = await call(
            "POST", f"{edge}/v1/track/click", json={"ref": "expiring"}, headers={"Authorization": f"Bearer {secret}"}
        )
        return got[0], got[1]

    first = await click(made["api_key"])  # cached by the edge from here on
    assert first[0] == 200 or time.monotonic() - made_at >= EXPIRES_IN_S, first

    async def refused() -> bool:
        return await click(made["api_key"]) == (401, {"error": "unauthorized"})

    await wait_for(refused, timeout=60, what="the expired key to be refused")
    assert await pg.fetchval("SELECT revoked_at FROM api_keys WHERE prefix = $1", made["prefix"]) is None
    made_by_cli = await procs.cli(
        "keys", "create", "--workspace", ws["workspace_id"], "--scopes", "track", "--expires-in", "30d"
    )
    assert made_by_cli["expires_at"] is not None
    forever = await procs.cli("keys", "create", "--workspace", ws["workspace_id"], "--scopes", "track")
    assert forever["expires_at"] is None
    assert (await click(forever["api_key"]))[0] == 200

    for bad in ("0", "soon", "-5m"):
        out = await procs.cli(
            "keys", "create", "--workspace", ws["workspace_id"], "--scopes", "track", "--expires-in", bad, check=False
        )
        assert out is None, bad  # refused: nothing printed on stdout
    admin_key = {"Authorization": f"Bearer {ws['api_key']}"}
    for bad_s in (0, -1, "tomorrow"):
        status, body, _ = await call(
            "POST", f"{edge}/v1/keys", json={"scopes": ["track"], "expires_in_s": bad_s}, headers=admin_key
        )
        assert status == 400 and "expires_in_s" in str(body), (bad_s, status, body)
    status, body, _ = await call(
        "POST", f"{edge}/v1/keys", json={"scopes": ["track"], "expires_in_s": 3600}, headers=admin_key
    )
    assert status == 201 and body["expires_at"] is not None, body


def test_a_principal_entry_reads_across_builds() -> None:
    """A key's Redis entry is read by edges of other builds during a rolling upgrade: a key
    without an expiry is written as the build before expiries wrote it, and an entry from a
    newer build with a field this one does not know still reads."""
    import orjson

    from ingest.edge.auth import Principal

    plain = Principal("k", "w", "workspace", ("track",), "rs_ab")
    assert "expires_ms" not in orjson.loads(plain.encode())
    assert Principal.decode(plain.encode()) == plain
    expiring = Principal("k", "w", "workspace", ("track",), "rs_ab", expires_ms=1_000)
    assert Principal.decode(expiring.encode()) == expiring and expiring.expired(1_000) and not expiring.expired(999)
    newer = orjson.dumps({**orjson.loads(plain.encode()), "region": "eu"})
    assert Principal.decode(newer) == plain
