"""Workspaces and links, as the CLI (and later the management API) create and read them.

Postgres is the truth; after each commit the link cache in Redis is written so the edge
sees the change without asking Postgres.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg

from . import apikeys, links
from .connections import Redis
from .keys import Keys

DEFAULT_PROGRAM = "Default program"
DEFAULT_AFFILIATE = "default"


class NotFound(LookupError):
    pass


async def create_workspace(conn: asyncpg.Connection, name: str) -> dict[str, str]:
    """A workspace and its first key, scope ``*``; the key is in the result only."""
    key = apikeys.mint("workspace")
    async with conn.transaction():
        ws = await conn.fetchval("INSERT INTO workspaces (name) VALUES ($1) RETURNING id", name)
        await conn.execute(
            "INSERT INTO api_keys (workspace_id, kind, key_hash, prefix, scopes, name)"
            " VALUES ($1, 'workspace', $2, $3, '{*}', 'default')",
            ws,
            key.digest,
            key.prefix,
        )
    return {"workspace_id": str(ws), "api_key": key.secret}


async def _default_program(conn: asyncpg.Connection, workspace_id: str) -> Any:
    pid = await conn.fetchval(
        "SELECT id FROM programs WHERE workspace_id = $1 AND name = $2 ORDER BY created_at LIMIT 1",
        workspace_id,
        DEFAULT_PROGRAM,
    )
    if pid is None:
        pid = await conn.fetchval(
            "INSERT INTO programs (workspace_id, name) VALUES ($1, $2) RETURNING id",
            workspace_id,
            DEFAULT_PROGRAM,
        )
    return pid


async def _default_affiliate(conn: asyncpg.Connection, workspace_id: str, program_id: Any) -> Any:
    return await conn.fetchval(
        "INSERT INTO affiliates (workspace_id, program_id, external_id, name) VALUES ($1, $2, $3, $3)"
        " ON CONFLICT (program_id, external_id) DO UPDATE SET external_id = EXCLUDED.external_id"
        " RETURNING id",
        workspace_id,
        program_id,
        DEFAULT_AFFILIATE,
    )


_LINK_COLUMNS = (
    "id, workspace_id, program_id, affiliate_id, code, url, domain, status,"
    " clicks, unique_clicks, bot_clicks, leads, conversions, last_clicked_at, created_at"
)


async def create_link(
    conn: asyncpg.Connection,
    redis: Redis,
    keys: Keys,
    *,
    workspace_id: str,
    code: str,
    url: str | None = None,
    program_id: str | None = None,
    affiliate_id: str | None = None,
) -> dict[str, Any]:
    """A link; a default program and affiliate are created when none are given."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id):
            raise NotFound(f"workspace {workspace_id} not found")
        pid = program_id or await _default_program(conn, workspace_id)
        aid = affiliate_id or await _default_affiliate(conn, workspace_id, pid)
        if url is None:
            url = await conn.fetchval("SELECT url FROM programs WHERE id = $1", pid) or "https://example.com/"
        row = await conn.fetchrow(
            f"INSERT INTO links (workspace_id, program_id, affiliate_id, code, url, domain)"
            f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_LINK_COLUMNS}",
            workspace_id,
            pid,
            aid,
            code,
            url,
            urlsplit(url).hostname,
        )
    # after the commit: a cached "unknown code" from before must not outlive the link
    await links.put(redis, keys, links.LinkInfo.from_record(row))
    return _link_json(row)


async def show_link(conn: asyncpg.Connection, code: str) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {_LINK_COLUMNS} FROM links WHERE code = $1", code)
    if row is None:
        raise NotFound(f"link {code!r} not found")
    return _link_json(row)


def _link_json(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, UUID):
            v = str(v)
        elif hasattr(v, "isoformat"):
            v = v.isoformat()
        out[k] = v
    return out
