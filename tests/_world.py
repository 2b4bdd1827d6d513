"""Test data and an in-process edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.host import server
from ingest.manage import admin

from ._procs import free_port

# what a tracker script in a browser sends; aiohttp's own User-Agent is (rightly) a bot
# an event's enrichment document, whichever form its row holds it in (schema.sql, version 16)
ENRICHMENT = "event_enrichment(enrichment, device_id, place_id, ip, country, asn, is_bot, referrer)"
BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.4 Safari/605.1.15"
)


async def start_edge(settings: Settings) -> tuple[web.AppRunner, str]:
    """The edge as ``refstream serve`` runs it (timeouts, guard); ``runner.cleanup()`` stops it."""
    served = await server.start(settings, "127.0.0.1", free_port())
    return served.runner, served.url


@dataclass
class World:
    workspace_id: str
    api_key: str
    program_id: str
    affiliate_id: str
    link: dict[str, Any]


async def make_world(
    pg: asyncpg.Pool, redis: Any, keys: Keys, *, code: str = "PARTNER123", name: str = "Acme"
) -> World:
    async with pg.acquire() as conn:
        ws = await admin.create_workspace(conn, name)
        program = await conn.fetchval(
            "INSERT INTO programs (workspace_id, name, url, cookie_window_days)"
            " VALUES ($1, 'Main', 'https://yoursite.com/', 60) RETURNING id",
            ws["workspace_id"],
        )
        affiliate = await conn.fetchval(
            "INSERT INTO affiliates (workspace_id, program_id, external_id, name, email)"
            " VALUES ($1, $2, 'user_123', 'Alex', 'alex@example.com') RETURNING id",
            ws["workspace_id"],
            program,
        )
        link = await admin.create_link(
            conn,
            redis,
            keys,
            workspace_id=ws["workspace_id"],
            code=code,
            url="https://yoursite.com/pricing",
            program_id=str(program),
            affiliate_id=str(affiliate),
        )
    return World(ws["workspace_id"], ws["api_key"], str(program), str(affiliate), link)


async def call(
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    source_ip: str = "127.0.0.1",
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request; the body parsed as JSON."""
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    body = orjson.dumps(json) if json is not None else data
    hdrs = CIMultiDict({"Content-Type": "application/json", "User-Agent": BROWSER})
    for name in set((headers or {}).keys()):
        hdrs.popall(name, None)  # the caller's value replaces a default ...
    hdrs.extend(headers or {})  # ... and repeated headers (X-Forwarded-For) stay repeated
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, url, data=body, headers=hdrs) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if raw else None, dict(r.headers)
