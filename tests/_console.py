"""The console in the test's process, on a real port, against the test's Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from ingest.contract.settings import Settings
from refstream.console.app import make_app

from ._procs import free_port

TOKEN = "console-test-token-0123456789abcdef"


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
    from ._world import BROWSER

    body = {"affiliate_url": f"https://yoursite.com/pricing?aff={code}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{edge}/api/v1/track/click", json=body, headers={"User-Agent": BROWSER}) as r,
    ):
        answer = await r.json()
        assert r.status == 200, answer
        return str(answer["click_id"])
