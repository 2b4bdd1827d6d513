"""Idempotency keys as clients meet them: tracker.js retrying a click whose answer was lost
(run by node against the real edge), `refstream serve` and `work` as processes, and a Redis
outage (public clicks spooled without the check: the worker stores one per key), and one key
sent to an edge that spools and to one that reaches Redis (stored once)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.contract.settings import Settings
from ingest.spool import store as spool_store
from workers.host.worker import drain as drain_streams

from ._procs import Procs, free_port
from ._proxy import Proxy
from ._redis import PrivateRedis
from ._world import World, call, start_edge
from .conftest import wait_for
from .faults._servers import FaultRedis
from .test_seed_002_affitor import EXAMPLE as AFFITOR_CLICK

# a Redis of its own, and node:
# the same whichever servers the suite uses, so scripts/test runs it in its first pass only
pytestmark = pytest.mark.once

# tracker.js in a page on https://yoursite.com/pricing?ref=PARTNER123, as little of a browser
# as it touches; timers 100x faster; prints the click id once the cookie is written
HARNESS = """
const api = process.argv[2];
let jar = "";
globalThis.window = globalThis;
window.innerWidth = 1280; window.innerHeight = 800;
globalThis.screen = {width: 1920, height: 1080};
Object.defineProperty(globalThis, "navigator", {value: {userAgent: "Mozilla/5.0 Chrome/124.0", language: "en-US"}});
globalThis.location = {search: "?ref=PARTNER123", origin: "https://yoursite.com", pathname: "/pricing",
                       href: "https://yoursite.com/pricing?ref=PARTNER123", protocol: "https:"};
globalThis.sessionStorage = {s: {}, getItem(k) { return this.s[k] || null; }, setItem(k, v) { this.s[k] = v; }};
globalThis.CustomEvent = class { constructor(t, o) { this.type = t; this.detail = o.detail; } };
globalThis.document = {
  currentScript: {dataset: {api}, src: api + "/tracker.js"}, title: "Pricing", referrer: "",
  get cookie() { return jar; },
  set cookie(c) { jar = c.split(";")[0]; },
  dispatchEvent(e) { console.log(JSON.stringify(e.detail)); process.exit(0); },
};
const later = setTimeout;
globalThis.setTimeout = (fn, ms) => later(fn, ms / 100);
later(() => { console.log("timeout"); process.exit(2); }, 10000);
require("vm").runInThisContext(require("fs").readFileSync(process.argv[3], "utf8"));
"""


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("no node to run tracker.js")
    return found


async def test_tracker_retries_a_lost_answer_with_its_key_and_counts_once(
    node: str, edge: str, world: World, pg: asyncpg.Pool, drain: Any, tmp_path: Path
):
    # in front of the edge: the first click reaches it, and its answer is lost on the way back
    seen: list[bytes] = []

    async def lossy(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{edge}/api/v1/track/click", data=body, headers={"Content-Type": "text/plain"}) as r,
        ):
            answer = await r.read()
        if len(seen) == 1:
            return web.Response(status=502, text="bad gateway")
        return web.Response(body=answer, status=r.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/track/click", lossy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    tracker = resources.files("ingest").joinpath("static/tracker.js")
    try:
        proc = await asyncio.create_subprocess_exec(
            node, str(harness), f"http://127.0.0.1:{port}", str(tracker), stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, out
    click_id = orjson.loads(out)["clickId"]
    assert len(seen) == 2 and seen[0] == seen[1], seen  # the retry: the same bytes, its key included
    assert orjson.loads(seen[0])["dedupe"].startswith("rs_")
    await drain()
    stored = await pg.fetch("SELECT event_id FROM events WHERE dialect = 'affitor'")
    assert ["clk_" + r["event_id"].hex for r in stored] == [click_id]  # one click: the first copy's


async def test_keyed_repeats_through_the_real_processes(procs: Procs, pg: asyncpg.Pool):
    ws = await procs.cli("workspace", "create", "Acme")
    await procs.cli("link", "create", "--workspace", ws["workspace_id"], "--code", "alice")
    base = await procs.start_edge()
    procs.start("work")
    auth = {"Authorization": f"Bearer {ws['api_key']}"}
    sent = []
    for n in range(10):  # each key sent twice, some at once, some after the first answer
        body, headers = {"ref": "alice", "url": f"https://a.test/{n}"}, {**auth, "Idempotency-Key": f"k{n}"}
        if n % 2:
            pair = await asyncio.gather(
                *(call("POST", f"{base}/v1/track/click", json=body, headers=headers) for _ in range(2))
            )
        else:
            pair = [await call("POST", f"{base}/v1/track/click", json=body, headers=headers) for _ in range(2)]
        assert pair[0][:2] == pair[1][:2] and pair[0][0] == 200, pair
        sent.append(pair[0][1]["visitor_id"])

    # an append that missed the edge's deadline (a loaded machine) was spooled and answered:
    # nothing is pending until the edge's spool has drained into the streams too
    async def spool_empty() -> bool:
        return spool_store.usage(Path(procs.settings.spool_dir)).entries == 0

    await wait_for(spool_empty, timeout=30, what="the edge's spool to drain")
    await procs.cli("work", "--drain")
    rows = await pg.fetch("SELECT visitor_id FROM events")
    assert sorted(r["visitor_id"] for r in rows) == sorted(sent)
    assert (await procs.cli("link", "show", "alice"))["clicks"] == 10


async def test_redis_down_spools_without_the_check_and_the_worker_counts_one(
    settings: Settings, private_redis: PrivateRedis, world: World, pg: asyncpg.Pool, tmp_path: Path
):
    own = settings.model_copy(update={"redis_url": private_redis.url})
    a, base_a = await start_edge(own.model_copy(update={"spool_dir": str(tmp_path / "a")}))
    b, base_b = await start_edge(own.model_copy(update={"spool_dir": str(tmp_path / "b")}))
    click = {**AFFITOR_CLICK, "dedupe": "while-down"}
    try:
        private_redis.kill()
        # no copy's script ran: no answer is certain (another copy may be in Redis), so
        # each is kept in the spool (once per spool) and answered "may be stored"
        first = await call("POST", f"{base_a}/api/v1/track/click", json=click)
        assert first[0] == 503 and first[2]["Refstream-Outcome"] == "unknown", first
        assert "Refstream-Event-Id" not in first[2]  # the stored copy may be another's
        again = await call("POST", f"{base_a}/api/v1/track/click", json=click)
        assert again[0] == 503 and again[2]["Refstream-Outcome"] == "unknown"
        assert spool_store.usage(tmp_path / "a").entries == 1  # the repeat was not kept
        elsewhere = await call("POST", f"{base_b}/api/v1/track/click", json=click)  # another spool
        assert elsewhere[0] == 503 and elsewhere[2]["Refstream-Outcome"] == "unknown"
        # fail closed where there is no spool: a keyed route refuses rather than counts blind
        keyed = {"Authorization": f"Bearer {world.api_key}", "Idempotency-Key": "x"}
        status, _, headers = await call("POST", f"{base_a}/v1/track/click", json={"ref": "PARTNER123"}, headers=keyed)
        assert status == 503 and "Refstream-Outcome" not in headers

        private_redis.start()
        spooled = [tmp_path / "a", tmp_path / "b"]

        async def drained() -> bool:
            return all(spool_store.usage(d).entries == 0 for d in spooled)

        await wait_for(drained, timeout=30, what="both spools to drain")
        # Redis is back: the client's retry gets the stored copy's answer
        late = await call("POST", f"{base_a}/api/v1/track/click", json=click)
        assert late[0] == 200 and late[2]["Idempotent-Replayed"] == "true"
    finally:
        await a.cleanup()
        await b.cleanup()
    await drain_streams(own)
    rows = await pg.fetch("SELECT event_id FROM events WHERE dialect = 'affitor'")
    assert len(rows) == 1  # two copies spooled, one stored: the drain's check and the key's dedupe
    assert "clk_" + rows[0]["event_id"].hex == late[1]["click_id"]
    assert await pg.fetchval("SELECT clicks FROM links WHERE code = 'PARTNER123'") == 1


async def test_one_key_through_a_spool_and_redis_is_stored_once(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    # issue 24, defect 3: edge B spools while edge A reaches Redis; one key sent to both
    server = await private_fault_redis()
    road = Proxy(server.port)  # B's way to Redis: nothing listens there until it starts
    a, base_a = await start_edge(_edge_settings(settings, server.url, tmp_path / "a"))
    b, base_b = await start_edge(_edge_settings(settings, road.url, tmp_path / "b"))

    async def click(base: str, key: str) -> tuple[int, Any, dict[str, str]]:
        return await call("POST", f"{base}/api/v1/track/click", json=AFFITOR_CLICK, headers={"Idempotency-Key": key})

    try:
        spooled_1 = await click(base_b, "one")
        assert spooled_1[0] == 503 and spooled_1[2]["Refstream-Outcome"] == "unknown"
        assert spool_store.usage(tmp_path / "b").entries == 1
        on_redis_1 = await click(base_a, "one")  # A cannot know what B spooled
        assert on_redis_1[0] == 200 and "Idempotent-Replayed" not in on_redis_1[2]
        spooled_2 = await click(base_b, "two")
        assert spooled_2[0] == 503 and spooled_2[2]["Refstream-Outcome"] == "unknown"

        await road.start()
        await wait_for(lambda: _empty(tmp_path / "b"), timeout=30, what="B's spool to drain")
        # "two" drained before A saw it: the client's retry gets the drained copy's answer
        late_2 = await click(base_a, "two")
        assert late_2[0] == 200 and late_2[2]["Idempotent-Replayed"] == "true"
        late_1 = await click(base_b, "one")  # and "one"'s retry on B: A's answer
        assert late_1[:2] == on_redis_1[:2] and late_1[2]["Idempotent-Replayed"] == "true"
    finally:
        await a.cleanup()
        await b.cleanup()
        await road.close()
    await drain_streams(_edge_settings(settings, server.url, tmp_path / "a"))
    rows = await pg.fetch("SELECT event_id FROM events WHERE dialect = 'affitor'")
    # "one": B's copy drained through the key's check, found A's record, and was not appended;
    # "two": B's copy, whose answer the retry got
    stored = sorted("clk_" + r["event_id"].hex for r in rows)
    assert stored == sorted([on_redis_1[1]["click_id"], late_2[1]["click_id"]])


async def test_a_key_no_script_ran_for_is_never_answered_as_accepted(
    settings: Settings,
    world: World,
    pg: asyncpg.Pool,
    private_fault_redis: Callable[..., Awaitable[FaultRedis]],
    tmp_path: Path,
) -> None:
    # found by the generative test (seed 1505720785): a keyed click's first copy reached a
    # stalled Redis (its edge was stopped meanwhile) and its retry, to the other edge, was
    # spooled and answered 200 with its own click id; at the thaw Redis ran the first copy's
    # script, so the click stored was not the one answered. Redis cannot say which copy of a
    # key is first while it cannot run the script: every spooled copy is "may be stored"
    server = await private_fault_redis()
    road = Proxy(server.port)  # both edges' way to Redis: nothing listens there until it starts
    shared = tmp_path / "spool"
    a, base_a = await start_edge(_edge_settings(settings, road.url, shared))
    b, base_b = await start_edge(_edge_settings(settings, road.url, shared))

    async def click(base: str, key: str) -> tuple[int, Any, dict[str, str]]:
        return await call("POST", f"{base}/api/v1/track/click", json=AFFITOR_CLICK, headers={"Idempotency-Key": key})

    try:
        first = await click(base_a, "one")
        again = await click(base_b, "one")  # the same key, to the other edge of the spool
        for answer in (first, again):
            assert answer[0] == 503 and answer[2]["Refstream-Outcome"] == "unknown", answer
            assert "Refstream-Event-Id" not in answer[2]
        assert spool_store.usage(shared).entries == 1  # one copy kept
        # "two": spooled by B; once Redis is back, a retry reaches A before the drain does
        # and Redis's script decides: the retry's copy is stored, the spooled one is not
        spooled = await click(base_b, "two")
        assert spooled[0] == 503 and spooled[2]["Refstream-Outcome"] == "unknown"
        fd = os.open(shared / spool_store.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # no edge drains while this test holds the lock
        try:
            await road.start()
            answers = []

            async def retried() -> bool:  # as a client does: "may be stored" until A's breaker closes
                answers.append(await click(base_a, "two"))
                return answers[-1][0] != 503

            await wait_for(retried, timeout=10, what="A to reach Redis again")
            late = answers[-1]
            assert late[0] == 200 and "Idempotent-Replayed" not in late[2]
            assert spool_store.usage(shared).entries == 2  # no retry kept: the key's copy waits
        finally:
            os.close(fd)
        await wait_for(lambda: _empty(shared), timeout=30, what="the spool to drain")
        late_one = await click(base_b, "one")  # the drained copy of "one" is the key's answer
        assert late_one[0] == 200 and late_one[2]["Idempotent-Replayed"] == "true"
        assert (await click(base_a, "two"))[:2] == late[:2]
    finally:
        await a.cleanup()
        await b.cleanup()
        await road.close()
    await drain_streams(_edge_settings(settings, server.url, shared))
    rows = await pg.fetch("SELECT event_id FROM events WHERE dialect = 'affitor'")
    stored = sorted("clk_" + r["event_id"].hex for r in rows)
    assert stored == sorted([late_one[1]["click_id"], late[1]["click_id"]])


def _edge_settings(settings: Settings, redis_url: str, spool: Path) -> Settings:
    return settings.model_copy(update={"redis_url": redis_url, "spool_dir": str(spool)})


async def _empty(directory: Path) -> bool:
    return spool_store.usage(directory).entries == 0
