"""A workspace's do-not-track list (``ingest.contract.suppression``): add, list, remove.
Only digests are kept: a listing says what kind each entry is and when it was made, never
its value (the one who listed it knows it)."""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.contract import erasure, suppression
from ingest.contract.errors import NotFound


async def add(conn: asyncpg.Connection, workspace_id: str, kind: str, value: str, *, by: str) -> dict[str, Any]:
    key = await erasure.salt(conn)
    d = suppression.digest(key, workspace_id, kind, value)
    row = await conn.fetchrow(
        "INSERT INTO suppressions (workspace_id, kind, digest, created_by) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (workspace_id, digest) DO UPDATE SET kind = suppressions.kind"
        " RETURNING kind, created_at",
        workspace_id,
        kind,
        d,
        by,
    )
    return {"id": d.hex(), "kind": row["kind"], "created_at": row["created_at"].isoformat()}


async def listing(conn: asyncpg.Connection, workspace_id: str) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT digest, kind, created_at, created_by FROM suppressions WHERE workspace_id = $1 ORDER BY created_at",
        workspace_id,
    )
    return {
        "data": [
            {
                "id": bytes(r["digest"]).hex(),
                "kind": r["kind"],
                "created_at": r["created_at"].isoformat(),
                "created_by": r["created_by"],
            }
            for r in rows
        ]
    }


async def remove(conn: asyncpg.Connection, workspace_id: str, entry: str) -> None:
    try:
        d = bytes.fromhex(entry)
    except ValueError:
        raise NotFound("suppression not found") from None
    done = await conn.execute("DELETE FROM suppressions WHERE workspace_id = $1 AND digest = $2", workspace_id, d)
    if done.endswith(" 0"):
        raise NotFound("suppression not found")
