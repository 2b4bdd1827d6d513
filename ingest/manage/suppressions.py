"""A workspace's do-not-track list (``ingest.contract.suppression``): add (at most
``REFSTREAM_SUPPRESSION_MAX`` entries a workspace), list (by page, newest first), remove.
Only digests are kept: a listing says what kind each entry is and when it was made, never
its value (the one who listed it knows it). Every change is logged for the edges by
schema.sql's trigger (``suppression_changes``), under the advisory lock ``add`` takes first."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest.contract import erasure, suppression
from ingest.contract.errors import NotFound, Refused
from ingest.edge.body import BodyError

LOCK = 7526373237072  # schema.sql's suppressions_logged() takes it too: one writer at a time
CURSOR = re.compile(r"([0-9]{1,20})-([0-9a-f]{32})")  # a page's `before`: created_at in µs, the id


class Full(Refused):
    """The workspace lists as many entries as it may: the route's 409."""

    def __init__(self, most: int) -> None:
        super().__init__(f"a workspace lists at most {most} entries (REFSTREAM_SUPPRESSION_MAX): take some off first")


_EXISTING = "SELECT kind, created_at FROM suppressions WHERE workspace_id = $1 AND digest = $2"
_COUNT = "SELECT count(*) FROM suppressions WHERE workspace_id = $1"


async def add(
    conn: asyncpg.Connection, workspace_id: str, kind: str, value: str, *, by: str, most: int | None = None
) -> dict[str, Any]:
    """List ``value``; one listed already is answered as it is. With ``most``, ``Full`` when
    the workspace lists that many already (counted under the lock every change takes)."""
    key = await erasure.salt(conn)
    d = suppression.digest(key, workspace_id, kind, value)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
        row = await conn.fetchrow(_EXISTING, workspace_id, d)
        if row is None:
            if most is not None and await conn.fetchval(_COUNT, workspace_id) >= most:
                raise Full(most)
            row = await conn.fetchrow(
                "INSERT INTO suppressions (workspace_id, kind, digest, created_by) VALUES ($1, $2, $3, $4)"
                " RETURNING kind, created_at",
                workspace_id,
                kind,
                d,
                by,
            )
    return {"id": d.hex(), "kind": row["kind"], "created_at": row["created_at"].isoformat()}


def cursor(before: str) -> tuple[datetime, bytes]:
    """A page's ``before`` (a listing's ``next``): the route's 400 when it is not one."""
    m = CURSOR.fullmatch(before)
    if m is None:
        raise BodyError(400, "invalid", "before: a listing's next")
    us = int(m[1])
    try:
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    except OverflowError:
        raise BodyError(400, "invalid", "before: a listing's next") from None
    return at, bytes.fromhex(m[2])


_PAGE = (
    "SELECT digest, kind, created_at, created_by FROM suppressions WHERE workspace_id = $1 {after}"
    " ORDER BY created_at DESC, digest DESC LIMIT $2"
)


def _us(at: datetime) -> int:
    delta = at - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


async def listing(conn: asyncpg.Connection, workspace_id: str, before: str | None, limit: int) -> dict[str, Any]:
    """A page of the list, newest first (``suppressions_listing``), and the next page's
    ``before`` (None: the last page)."""
    args: list[Any] = [workspace_id, limit + 1]
    after = ""
    if before is not None:
        args += cursor(before)
        after = "AND (created_at, digest) < ($3, $4)"
    rows = await conn.fetch(_PAGE.format(after=after), *args)
    page = rows[:limit]
    return {
        "data": [
            {
                "id": bytes(r["digest"]).hex(),
                "kind": r["kind"],
                "created_at": r["created_at"].isoformat(),
                "created_by": r["created_by"],
            }
            for r in page
        ],
        "next": f"{_us(page[-1]['created_at'])}-{bytes(page[-1]['digest']).hex()}" if len(rows) > limit else None,
    }


async def remove(conn: asyncpg.Connection, workspace_id: str, entry: str) -> None:
    try:
        d = bytes.fromhex(entry)
    except ValueError:
        raise NotFound("suppression not found") from None
    done = await conn.execute("DELETE FROM suppressions WHERE workspace_id = $1 AND digest = $2", workspace_id, d)
    if done.endswith(" 0"):
        raise NotFound("suppression not found")
