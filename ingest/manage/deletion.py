"""Deleting a workspace: every row it owns, in one transaction, and the caches that name it.

Tables whose ``workspace_id`` references ``workspaces`` go with it by ``ON DELETE CASCADE``;
the others (events, their dedupe keys and flags, the drop tallies: written per event, where
a foreign key would cost a lookup on every insert) are deleted first, by workspace, and
those keyed by a link alone (unique visitors per day) by its links. Which tables those are
is read from the catalogue, so a table added later is never left behind.

After the commit, each of its keys' cache entries becomes a tombstone and each of its links'
an unknown code, so the edges refuse them at once rather than when the entries expire. An
event already in a stream for a deleted link is dropped by the workers (``unknown_link``).

What the erasure ledger held for the workspace goes with it, and only that: another
workspace's erasure of a person with the same client-chosen id keeps its own entries.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import asyncpg
import orjson
import structlog

from ingest.contract import links
from ingest.contract.connections import Redis, write
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.edge import auth
from ingest.privacy import erasure_copy

log = structlog.get_logger("ingest.deletion")

# base tables (a partitioned table, not its partitions) with a workspace_id column that no
# foreign key ties to workspaces: the cascade does not reach them (the directory's own
# tables aside: where a workspace is, which the command that deletes it clears itself)
UNTIED = """
SELECT c.relname AS name
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attname = 'workspace_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname = current_schema() AND c.relname NOT IN ('workspace_shards', 'link_codes', 'workspace_moves')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f'
                  AND k.confrelid = 'workspaces'::regclass AND a.attnum = ANY (k.conkey))
ORDER BY 1
"""
# and those keyed by a link only (link_visitor_days: one row per link, day and visitor), which
# neither a workspace_id nor a foreign key ties to the workspace
BY_LINK = """
SELECT c.relname AS name
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attname = 'link_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname = current_schema()
  AND NOT EXISTS (SELECT 1 FROM pg_attribute w WHERE w.attrelid = c.oid AND w.attname = 'workspace_id'
                  AND NOT w.attisdropped)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f'
                  AND k.confrelid = 'links'::regclass)
ORDER BY 1
"""


async def delete_workspace(
    conn: asyncpg.Connection, redis: Redis, keys: Keys, workspace_id: str, *, replicas: int = 0, wait_ms: int = 500
) -> dict[str, Any]:
    """Delete the workspace and everything it owns; what was deleted from the tables its
    foreign keys' cascade does not reach, by table, and how many links and keys it had."""
    try:
        ws = uuid.UUID(workspace_id)
    except ValueError:
        raise NotFound(f"workspace {workspace_id[:64]!r} not found (not a workspace id)") from None
    marked = False  # once its marks may be in Redis: a rollback after them takes them back
    try:
        async with write(conn):
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE)", ws):
                raise NotFound(f"workspace {workspace_id} not found")
            # each link's cache entry is replaced by "unknown" at a version newer than its own
            codes = {
                r["code"]: r["v"]
                for r in await conn.fetch(
                    "SELECT code, nextval('link_cache_version') AS v FROM links WHERE workspace_id = $1", ws
                )
            }
            digests = [
                bytes(r["key_hash"])
                for r in await conn.fetch("SELECT key_hash FROM api_keys WHERE workspace_id = $1", ws)
            ]
            deleted = await delete_rows(conn, ws)
            # the caches marked before the commit, and at replicas:N (``replicas``) on N
            # replicas, else the deletion is rolled back (and its marks taken back:
            # ``_unmark``): a link's entry lives until it is replaced, a key's a day, and once
            # the rows are gone nothing names them to mark them again. (An edge refills an
            # entry only where none is, a link only at a newer version.)
            marked = True
            await _mark_gone(Replicated(redis, replicas, wait_ms), keys, digests, codes)
    except Exception:
        if marked:
            await _unmark(conn, redis, keys, ws)
        raise
    # again after the commit: an edge may have refilled one from a row still there meanwhile
    for digest in digests:
        await auth.cache_key(redis, keys, digest, None)
    await links.put_deleted(redis, keys, codes)
    # its erasures' copy outside Postgres (``erasure_copy``: digests, nothing personal, and a
    # restore skips a deleted workspace's anyway): gone with it
    gone = [f async for f, raw in redis.hscan_iter(erasure_copy.key(keys)) if _of(raw, str(ws))]
    if gone:
        await redis.hdel(erasure_copy.key(keys), *gone)  # type: ignore[misc]
    # Affixo's fingerprints of its visitors (``fp:<workspace>:<hash>``), and what indexes
    # what an erasure must reach (``ingest.contract.erasure_index``): its fingerprints by
    # visitor, its records by event, its entries by digest
    for pattern in (keys.fingerprint(str(ws), "*"), f"{keys.prefix}:fpv:{ws}:*", keys.entries_of(str(ws), b"") + "*"):
        async for name in redis.scan_iter(match=pattern, count=1000):
            await redis.delete(name)
    for index in (keys.answers(str(ws)), keys.answers_filed(str(ws)), keys.answers_before(str(ws))):
        await redis.delete(index)  # one at a time: on a Redis Cluster, their slots differ
    return {"workspace_id": str(ws), "deleted": deleted, "links": len(codes), "keys": len(digests)}


async def _mark_gone(writer: Replicated, keys: Keys, digests: list[bytes], codes: dict[str, int]) -> None:
    """The workspace's keys and links marked unknown in Redis (``writer``: at the level)."""
    try:
        marks = [auth.unknown(keys, d) for d in digests] + links.deleted_commands(keys, codes)
        await writer.send(marks, "the workspace's keys and links marked deleted")
    finally:
        await writer.aclose()


async def _unmark(conn: asyncpg.Connection, redis: Redis, keys: Keys, ws: uuid.UUID) -> None:
    """A deletion rolled back after its marks were sent (too few replicas took them, the
    commit failed): its links and keys, live still, were refused by every edge until the
    marks expired (a link's in 300 s, a key's in 60). Each link is put back from its row at
    a version drawn now (a mark's is newer than the row's), each key's entry removed (an
    edge refills it from its row). Best effort: where Postgres or Redis cannot, the marks
    expire. A commit whose outcome was unknown and that was made keeps its marks."""
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1)", ws):
            return
        rows = await conn.fetch(links.LINK_SELECT + " WHERE l.workspace_id = $1", ws)
        digests = [r["key_hash"] for r in await conn.fetch("SELECT key_hash FROM api_keys WHERE workspace_id = $1", ws)]
        now = [
            dataclasses.replace(links.LinkInfo.from_record(r), version=v)
            for r, v in zip(rows, await _versions(conn, len(rows)), strict=True)
        ]
        await links.put(redis, keys, *now)
        for digest in digests:  # one at a time: on a Redis Cluster, their slots differ
            await redis.delete(keys.apikey(bytes(digest).hex()))
    except Exception as exc:  # the deletion's own error is the one raised
        log.warning("deletion.unmark_failed", workspace_id=str(ws), error=type(exc).__name__)


async def _versions(conn: asyncpg.Connection, n: int) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT nextval('link_cache_version') FROM generate_series(1, $1)", n)]


async def delete_rows(conn: asyncpg.Connection, ws: uuid.UUID) -> dict[str, int]:
    """Every row of the workspace in this database, in the caller's transaction (nothing
    of Redis): what went from the tables the cascade does not reach, by table. A workspace's
    deletion, and the old copy of one that moved to another shard (``workspace move
    --drop-old``)."""
    deleted: dict[str, int] = {}
    for r in await conn.fetch(UNTIED):
        status = await conn.execute(f'DELETE FROM "{r["name"]}" WHERE workspace_id = $1', ws)
        if n := int(status.rsplit(" ", 1)[-1]):
            deleted[r["name"]] = n
    for r in await conn.fetch(BY_LINK):
        status = await conn.execute(
            f'DELETE FROM "{r["name"]}" WHERE link_id IN (SELECT id FROM links WHERE workspace_id = $1)', ws
        )
        if n := int(status.rsplit(" ", 1)[-1]):
            deleted[r["name"]] = n
    await conn.execute("DELETE FROM workspaces WHERE id = $1", ws)
    return deleted


def _of(raw: bytes, workspace_id: str) -> bool:
    """Whether an erasure's copy is this workspace's (one that is no copy: not ours to judge)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("workspace_id") == workspace_id
