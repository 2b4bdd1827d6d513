"""The clicks an import stored, found again by the source's own id: what a lead naming its
click (``"click": "c-881"``) takes from it, its link's code, its click id and its visitor.

The map is in Postgres (``import_clicks``, schema version 11), not in the import's memory:
an import of any length holds one batch, and a lead finds its click however many batches,
runs or resumed runs ago the click was imported. A row holds the workspace, the source, a
digest of the source's click id and the click's event id: the code and the visitor are read
from the click's own event row, so an erasure that scrubs that row reaches them too.
Tenants are walls: every read and write names the workspace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

import asyncpg

_WRITE = """
INSERT INTO import_clicks (workspace_id, source, source_digest, event_id)
SELECT $1, $2, d, e FROM unnest($3::bytea[], $4::uuid[]) AS t (d, e)
ORDER BY d
ON CONFLICT DO NOTHING
"""

# the click's own row: its link's code (the workspace's link) and its visitor
_READ = """
SELECT m.source_digest, e.event_id, l.code, e.visitor_id
FROM import_clicks m
JOIN events e ON e.event_id = m.event_id AND e.workspace_id = m.workspace_id
JOIN links l ON l.id = e.link_id AND l.workspace_id = m.workspace_id
WHERE m.workspace_id = $1 AND m.source = $2 AND m.source_digest = ANY($3::bytea[])
"""


@dataclass(frozen=True, slots=True)
class Click:
    """What a lead naming an imported click takes from it."""

    event_id: UUID
    code: str
    visitor: str | None  # None: scrubbed by an erasure


def digest(source_id: str) -> bytes:
    return hashlib.blake2b(source_id.encode(), digest_size=12).digest()


async def remember(pool: asyncpg.Pool, workspace_id: str, source: str, clicks: Iterable[tuple[str, UUID]]) -> None:
    """Record ``(source id, event id)`` of clicks a committed batch holds (stored now, or
    before: a duplicate); once per source id."""
    pairs = sorted({digest(source_id): event_id for source_id, event_id in clicks}.items())
    if not pairs:
        return
    async with pool.acquire() as conn:
        await conn.execute(_WRITE, UUID(workspace_id), source, [d for d, _ in pairs], [e for _, e in pairs])


async def find(pool: asyncpg.Pool, workspace_id: str, source: str, source_ids: Iterable[str]) -> dict[str, Click]:
    """The stored clicks of these source ids, by source id; an id this source never
    imported, or whose click is not stored, is absent."""
    by_digest = {digest(s): s for s in source_ids}
    if not by_digest:
        return {}
    async with pool.acquire() as conn:
        found = await conn.fetch(_READ, UUID(workspace_id), source, list(by_digest))
    return {by_digest[bytes(r["source_digest"])]: Click(r["event_id"], r["code"], r["visitor_id"]) for r in found}
