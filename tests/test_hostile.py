"""Hostile input never yields a 5xx, a hang, a stall or a request to our own network.

Each payload of issue 15 as a regression test, with the exact 4xx status and shape; a
slowloris and a gzip bomb, each with a normal request answered meanwhile; webhook targets on
our own network refused at creation and at delivery.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import secretbox
from ingest.ledger.targets import PrivateAddress, PublicResolver, literal, refusal
from workers.consumer import webhooks

from ._procs import free_port
from ._world import World, call, start_edge

# the edge's HTTP boundary:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = [pytest.mark.once, pytest.mark.timeout(120)]

JSON = {"Content-Type": "application/json"}


def bearer(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.api_key}"}


@pytest.fixture
async def edge_with(settings: Settings, redis: Any, pg: asyncpg.Pool) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """An edge as ``refstream serve`` runs it, with these settings changed."""
    runners: list[web.AppRunner] = []

    async def start(**changes: Any) -> str:
        runner, base = await start_edge(settings.model_copy(update=changes))
        runners.append(runner)
        return base

    yield start
    for runner in runners:
        await runner.cleanup()


async def raw(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def answer(reader: asyncio.StreamReader, within: float = 10) -> tuple[int, dict[str, str], Any]:
    """The status, headers and JSON body of the one response on a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), within)
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else None


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """The server closed the connection (EOF or reset) within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def timed_health(base: str) -> float:
    """Seconds a fresh GET /healthz takes to be answered."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as r:
        assert r.status == 200
        await r.read()
    return time.perf_counter() - started


# 500s and answers that never come ---------------------------------------------------------


async def test_a_wrong_content_encoding_is_each_routes_400(edge: str, world: World):
    not_gzip = {"Content-Encoding": "gzip", **JSON}
    body = orjson.dumps({"ref": "PARTNER123"})
    status, out, _ = await call("POST", f"{edge}/v1/track/click", data=body, headers={**not_gzip, **bearer(world)})
    assert status == 400 and out["error"] == "invalid_json" and "gzip" in out["detail"]
    aff = orjson.dumps({"affiliate_url": "https://x.example/?aff=PARTNER123"})
    status, out, _ = await call("POST", f"{edge}/api/v1/track/click", data=aff, headers=not_gzip)
    assert (status, out) == (400, {"success": False, "error": "Invalid JSON body"})
    lead = orjson.dumps({"clickId": "x", "eventName": "e", "customerExternalId": "c"})
    status, out, _ = await call("POST", f"{edge}/api/track/lead", data=lead, headers={**not_gzip, **bearer(world)})
    assert status == 400 and out["error"]["code"] == "VALIDATION_ERROR"
    status, out, _ = await call("POST", f"{edge}/v1/events/batch", data=b"[]", headers={**not_gzip, **bearer(world)})
    assert status == 400 and out["error"] == "invalid_json"
    status, out, _ = await call("POST", f"{edge}/v1/programs", data=b"{}", headers={**not_gzip, **bearer(world)})
    assert status == 400 and out["error"] == "invalid_json"
    status, out, _ = await call("POST", f"{edge}/api/v1/referral/click/PARTNER123", data=b"{}", headers={**not_gzip})
    assert status == 400 and out == {
        "success": False,
        "error": {"statusCode": 400, "code": "bad_request", "message": out["error"]["message"]},
    }
    # an encoding we do not speak: 415, in the route's shape
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/click", data=body, headers={"Content-Encoding": "br", **JSON, **bearer(world)}
    )
    assert status == 415 and out["error"] == "unsupported_encoding"
    # and real gzip is read
    status, out, _ = await call(
        "POST", f"{edge}/v1/track/click", data=gzip.compress(body), headers={**not_gzip, **bearer(world)}
    )
    assert status == 200 and out["ok"] is True


async def test_chunked_framing_that_breaks_after_the_headers_is_answered(edge_with, world: World):
    base = await edge_with(body_timeout_s=1.0)
    reader, writer = await raw(base)
    writer.write(
        b"POST /api/v1/track/click HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the framing breaks after the headers were read: what is being tested
    writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
    await writer.drain()
    status, _, out = await answer(reader, within=5)
    # aiohttp's parser drops the framing error without telling the body's reader: the read
    # deadline answers it, and the connection is closed
    assert (status, out) == (408, {"success": False, "error": "body not received within 1 s"})
    assert await closed(reader, within=5)
    writer.close()


async def test_urls_that_do_not_parse_are_400(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    h = bearer(world)
    bad = "http://[::1"
    status, out, _ = await call(
        "POST", f"{edge}/v1/links", json={"affiliate_id": world.affiliate_id, "url": bad}, headers=h
    )
    assert status == 400 and out["error"] == "invalid_request" and out["detail"].startswith("url:")
    link_id = world.link["id"]
    status, out, _ = await call("PATCH", f"{edge}/v1/links/{link_id}", json={"url": bad}, headers=h)
    assert status == 400 and out["error"] == "invalid_request" and out["detail"].startswith("url:")
    for url in (bad, "http://a:99999/", "http://x y/", "http://a\x01b/", "https://"):
        status, out, _ = await call("POST", f"{edge}/v1/programs", json={"name": "P", "url": url}, headers=h)
        assert status == 400 and out["error"] == "invalid_request", (url, out)
    # a program stored with such a URL before URLs were checked: Bricqs' generate still answers
    program = await pg.fetchval(
        "INSERT INTO programs (workspace_id, name, url) VALUES ($1, 'Old', $2) RETURNING id", world.workspace_id, bad
    )
    status, out, _ = await call(
        "POST",
        f"{edge}/api/v1/referrals/generate",
        json={"participant_id": "p1", "campaign_id": str(program)},
        headers={"X-API-Key": world.api_key},
    )
    assert status == 200 and out["referral_url"].startswith("https://example.com/?ref="), out


async def test_nul_in_the_aff_value_and_in_path_segments(edge: str, world: World, redis, keys: Keys):
    await redis.delete(keys.links_warm)  # the link cache is cold: unknown codes would ask Postgres
    for aff in ("%00", "A%00B", "%01", "%C0"):
        status, out, _ = await call(
            "POST", f"{edge}/api/v1/track/click", json={"affiliate_url": f"https://x.example/?aff={aff}"}
        )
        assert status == 400 and out["success"] is False, (aff, status, out)
    h = bearer(world)
    # an external id with a NUL can name no one (docs/http-api.md "External ids"): the route's 400;
    # one with another control character inside is looked up as given, and found nowhere
    status, out, _ = await call("GET", f"{edge}/v1/customers/%00", headers=h)
    assert (status, out["error"]) == (400, "invalid_request"), out
    assert (await call("GET", f"{edge}/v1/customers/a%01b", headers=h))[:2] == (
        404,
        {"error": "not_found", "detail": "customer not found"},
    )
    assert (await call("DELETE", f"{edge}/v1/keys/%00", headers=h))[:2] == (
        404,
        {"error": "not_found", "detail": "prefix not found"},
    )


# caps, stalls and origins -----------------------------------------------------------------


async def test_seed_000_caps_its_body(edge: str, world: World, redis, keys: Keys, settings: Settings):
    big = b"x" * (10 * 1024 * 1024)
    status, out, headers = await call("POST", f"{edge}/api/v1/referral/click/PARTNER123", data=big)
    assert status == 413 and out == {
        "success": False,
        "error": {
            "statusCode": 413,
            "code": "payload_too_large",
            "message": f"body larger than {settings.max_body_bytes} bytes",
        },
    }
    assert headers.get("Connection", "").lower() == "close"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap is met while reading
        for _ in range(40):
            yield b"y" * 4096

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{edge}/api/v1/referral/click/PARTNER123", data=chunks()) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
    for p in range(settings.partitions):
        assert await redis.xlen(keys.stream(p)) == 0  # nothing counted
    status, out, _ = await call("POST", f"{edge}/api/v1/referral/click/PARTNER123", data=b"")
    assert (status, out) == (200, {"success": True, "data": {"tracked": True}})


async def test_seed_000_enforces_allowed_origins(edge: str, world: World, pg: asyncpg.Pool, redis, keys: Keys):
    from ingest.contract import links

    await pg.execute(
        "UPDATE workspaces SET allowed_origins = '{https://good.example}' WHERE id = $1", world.workspace_id
    )
    info = await links.fetch(pg, "PARTNER123")
    assert info is not None
    await links.put(redis, keys, info)
    url = f"{edge}/api/v1/referral/click/PARTNER123"
    status, out, headers = await call("POST", url, headers={"Origin": "https://evil.example"})
    assert (status, out) == (
        403,
        {
            "success": False,
            "error": {
                "statusCode": 403,
                "code": "origin_not_allowed",
                "message": "Origin not allowed for this workspace",
            },
        },
    )
    assert headers["Access-Control-Allow-Origin"] == "*"  # the browser may read why
    lengths = [await redis.xlen(keys.stream(p)) for p in range(keys.partitions)]
    assert sum(lengths) == 0
    for origin in ({"Origin": "https://good.example"}, {}):
        assert (await call("POST", url, headers=origin))[:2] == (200, {"success": True, "data": {"tracked": True}})
    assert sum([await redis.xlen(keys.stream(p)) for p in range(keys.partitions)]) == 2


def bomb(size: int = 1 << 30) -> bytes:
    """``size`` zero bytes, gzipped (about 1 MB for 1 GiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join([*(z.compress(block) for _ in range(size >> 20)), z.flush()])


async def test_a_gzip_bomb_is_refused_without_stalling_anyone(edge_with, world: World):
    base = await edge_with()
    payload = bomb()
    assert len(payload) < 1_100_000
    reader, writer = await raw(base)
    writer.write(
        b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nAuthorization: Bearer "
        + world.api_key.encode()
        + f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
    )

    async def send() -> None:
        try:
            for i in range(0, len(payload), 65536):
                writer.write(payload[i : i + 65536])
                await writer.drain()
        except ConnectionError:
            pass  # closed on us: what is expected once refused

    sender = asyncio.create_task(send())
    # while the bomb goes in, and after it was refused, a normal request is answered at once
    latencies = [await timed_health(base) for _ in range(5)]
    status, headers, out = await answer(reader)
    latencies += [await timed_health(base) for _ in range(5)]
    assert status == 413 and out["error"] == "payload_too_large", out
    assert headers.get("connection", "").lower() == "close"
    assert await closed(reader, within=5)
    await sender
    writer.close()
    # inflating the whole bomb in one go holds a core for seconds (about 4 s on the 2-core
    # machine the suite is run on); a health check that waits on it would show. Under the
    # suite's load a fresh connection alone can take a tenth of a second.
    assert max(latencies) < 1.0, latencies


async def test_slowloris_connections_are_closed_and_stall_no_one(edge_with, world: World):
    base = await edge_with(header_timeout_s=1.0, body_timeout_s=1.0, keepalive_timeout_s=1.5)
    conns = [await raw(base) for _ in range(50)]  # idle: not a byte sent
    dripping = [await raw(base) for _ in range(50)]
    for _, w in dripping:
        w.write(b"POST /api/v1/referral/click/PARTNER123 HTTP/1.1\r\nHost: x\r\n")
    bodies = [await raw(base) for _ in range(20)]  # headers in full, the body never
    for _, w in bodies:
        w.write(b"POST /api/v1/track/click HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    kept = await raw(base)  # a keep-alive connection, answered, then idle
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await answer(kept[0]))[0] == 200
    started = time.perf_counter()

    async def drip() -> None:
        while True:
            for _, w in dripping:
                w.write(b"X")
            await asyncio.sleep(0.1)

    dripper = asyncio.create_task(drip())
    try:
        latencies = [await timed_health(base) for _ in range(5)]
        results = await asyncio.gather(*(closed(r, within=5) for r, _ in [*conns, *dripping, *bodies, kept]))
        elapsed = time.perf_counter() - started
    finally:
        dripper.cancel()
    assert all(results), f"{results.count(False)} of {len(results)} still open"
    assert elapsed < 1.5 + 3, elapsed  # the longest deadline (keep-alive) plus the sweep and slack
    # a stall would hold a health check for a header deadline (1 s); under the suite's load a
    # fresh connection alone can take a tenth of a second, so the bound is half the deadline
    assert max(latencies) < 0.5, latencies
    for _, w in [*conns, *dripping, *bodies, kept]:
        w.close()


async def test_a_slow_body_gets_408_in_the_routes_shape(edge_with, world: World):
    base = await edge_with(body_timeout_s=0.5)
    reader, writer = await raw(base)
    writer.write(
        b"POST /v1/track/click HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + world.api_key.encode() + b"\r\nContent-Length: 50\r\n\r\n{"
    )
    status, headers, out = await answer(reader)
    assert (status, out["error"]) == (408, "request_timeout")
    assert headers.get("connection", "").lower() == "close"
    writer.close()


# spec and types -----------------------------------------------------------------------------


async def test_integers_are_strict(edge: str, world: World):
    h = bearer(world)
    status, out, _ = await call(
        "POST", f"{edge}/v1/programs", json={"name": "P", "cookie_window_days": "30"}, headers=h
    )
    assert status == 400 and out["error"] == "invalid_request" and "cookie_window_days" in out["detail"]
    milestones = [{"name": "m", "threshold": "5"}]
    status, out, _ = await call("POST", f"{edge}/v1/programs", json={"name": "P", "milestones": milestones}, headers=h)
    assert status == 400 and "threshold" in out["detail"]
    status, out, _ = await call("POST", f"{edge}/v1/programs", json={"name": "P", "cookie_window_days": 30}, headers=h)
    assert status == 201 and out["cookie_window_days"] == 30


async def test_the_batch_429_says_when_to_retry(edge_with, world: World):
    base = await edge_with(key_rate_limit_per_min=1)
    item = [{"type": "click", "ref": "PARTNER123"}]
    assert (await call("POST", f"{base}/v1/events/batch", json=item, headers=bearer(world)))[0] == 200
    status, out, headers = await call("POST", f"{base}/v1/events/batch", json=item, headers=bearer(world))
    assert (status, out) == (429, {"error": "rate_limited"})
    assert int(headers["Retry-After"]) >= 1


# webhooks -----------------------------------------------------------------------------------

OUR_NETWORK = [
    "http://127.0.0.1:9/h",
    "http://localhost:9/h",
    "http://[::1]:9/h",
    "http://0.0.0.0:9/h",
    "http://2130706433:9/h",
    "http://127.1:9/h",
    "http://0x7f.1:9/h",
    "http://[::ffff:127.0.0.1]:9/h",
    "http://10.0.0.1/h",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/h",
    "http://224.0.0.1/h",
    "http://foo.localhost/h",
    "http://100.64.0.1/h",
]


async def test_webhooks_to_our_own_network_are_refused_at_creation(edge: str, world: World, pg: asyncpg.Pool):
    for url in OUR_NETWORK:
        status, out, _ = await call("POST", f"{edge}/v1/webhooks", json={"url": url}, headers=bearer(world))
        assert status == 400 and out["error"] == "invalid_request" and out["detail"].startswith("url: "), (url, out)
    assert await pg.fetchval("SELECT count(*) FROM webhooks") == 0
    status, out, _ = await call(
        "POST", f"{edge}/v1/webhooks", json={"url": "https://hooks.example.com/h"}, headers=bearer(world)
    )
    assert status == 201


async def test_webhooks_to_our_own_network_are_not_delivered(pg: asyncpg.Pool, world: World, settings: Settings):
    received: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    key = secretbox.generate_key()
    here = socket.gethostname()  # a name, not a literal: only the resolver can refuse it
    addresses = {str(info[4][0]) for info in socket.getaddrinfo(here, port, type=socket.SOCK_STREAM)}
    assert addresses and not any(_public(a) for a in addresses), (
        f"{here} resolves to {addresses}: this test needs a name of this machine that is not public"
    )
    urls = [f"http://127.0.0.1:{port}/hook", f"http://2130706433:{port}/hook", f"http://{here}:{port}/hook"]
    ctx: dict[str, Any] = {"pg": pg, "settings": settings.model_copy(update={"secret_key": key})}
    await webhooks.webhook_startup(ctx)
    try:
        for url in urls:
            await pg.execute("TRUNCATE webhooks CASCADE")
            wid = await pg.fetchval(
                "INSERT INTO webhooks (workspace_id, url, events, secret_encrypted, secret_prefix)"
                " VALUES ($1, $2, '{lead.created}', $3, 'whsec_x') RETURNING id",
                world.workspace_id,
                url,
                secretbox.encrypt(key, secretbox.new_secret()),
            )
            delivery = await pg.fetchval(
                "INSERT INTO webhook_deliveries (webhook_id, event_type, subject_id, subject_key, payload)"
                " VALUES ($1, 'lead.created', $2, '', '{}') RETURNING id",
                wid,
                uuid.uuid4(),
            )
            try:
                outcome = await webhooks.deliver_webhook(ctx, str(delivery))
            except Exception as exc:  # arq.Retry: a resolver refusal is retried like any failure
                outcome = type(exc).__name__
            assert outcome in ("failed", "Retry"), (url, outcome)
            error = await pg.fetchval("SELECT error FROM webhook_attempts WHERE delivery_id = $1", delivery)
            assert "refused" in error, (url, error)
        assert received == []
    finally:
        await webhooks.webhook_shutdown(ctx)
        await runner.cleanup()
    with pytest.raises(PrivateAddress):
        await PublicResolver().resolve("localhost", 80)


def _public(address: str) -> bool:
    addr = literal(address)
    return addr is not None and refusal(addr) is None
