"""The console in the test's process, on a real port, against the test's Redis and Postgres."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from refstream.console.app import make_app

from ._procs import free_port
from ._world import BROWSER, World

TOKEN = "console-test-token-0123456789abcdef"
# what a hostile client puts in metadata: markup, and the end of a script element
HOSTILE = "<img src=x onerror=alert(1)>"
CLOSER = "</script><script>alert(2)</script>"


@asynccontextmanager
async def running(settings: Settings, *, token: str | None = TOKEN) -> AsyncIterator[str]:
    """``refstream console`` as its command runs it (no access log), at the URL it yields."""
    s = settings.model_copy(update={"console_token": token})
    runner = web.AppRunner(make_app(s, spool_dirs=[s.spool_dir]), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def call(
    base: str, path: str, key: str | None = TOKEN, *, body: Any = None, method: str | None = None
) -> tuple[int, Any]:
    """(status, JSON) of one API call with ``key`` as its Bearer header (None: none)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    verb = method or ("POST" if body is not None else "GET")
    async with (
        aiohttp.ClientSession() as http,
        http.request(verb, base + path, json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


async def affitor_click(edge: str, code: str) -> str:
    """A click through the edge, as Affitor's script sends it: its click id."""
    body = {"affiliate_url": f"https://yoursite.com/pricing?aff={code}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{edge}/api/v1/track/click", json=body, headers={"User-Agent": BROWSER}) as r,
    ):
        answer = await r.json()
        assert r.status == 200, answer
        return str(answer["click_id"])


async def lead_with_hostile_metadata(edge: str, world: World) -> None:
    """A click, and its lead through the edge with ``HOSTILE`` and ``CLOSER`` in metadata."""
    click_id = await affitor_click(edge, "PARTNER123")
    lead = {
        "clickId": click_id,
        "eventName": "Sign Up",
        "customerExternalId": "user_xss",
        "metadata": {"note": HOSTILE, "end": CLOSER},
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{edge}/api/track/lead", json=lead, headers={"Authorization": f"Bearer {world.api_key}"}) as r,
    ):
        assert r.status == 200, await r.text()


async def hostile_letter(redis: Any, keys: Keys, world: World) -> str:
    """A dead letter of a well-formed click with hostile metadata, as a worker writes one;
    its event id."""
    event = Envelope(
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        payload={"code": "PARTNER123", "metadata": {"note": HOSTILE, "end": CLOSER}},
        workspace_id=world.workspace_id,
        user_agent=BROWSER,
    )
    fields: dict[Any, Any] = {
        **wire.to_entry_dict(event),
        "id": "1-1",
        "error": f"store: {HOSTILE}",
        "deliveries": 3,
        "at": int(time.time() * 1000),  # the time it died
    }
    await redis.xadd(keys.dead, fields)
    return str(event.event_id)
