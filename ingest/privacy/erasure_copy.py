"""The erasure ledger's copy in Redis: what a restore of Postgres cannot take back.

An erasure lives in Postgres (``erasures``, ``erased_ids``). A restore of a backup taken
before it, or a failover onto a replica that lacked it, would lose it, and the documented
``refstream replay --since`` would then store the person raw again. (Refunds have a stream
copy for the same reason: ``workers.consumer.refunds``.) So every erasure is copied, as it
stands in the ledger, to one Redis hash (``{prefix}:erasure:ledger``, a field per erasure):
its row and its digests, no id, email or address, exactly what the ledger holds. The copy
is written where the erasure is made (the API, ``refstream erase``) and again by every
sweep for each pending erasure (what a writer taught the ledger since: a late lead's click),
and an erasure's Redis is done only once its copy is there (``workers.ops.erasure``).

``restore`` puts back into Postgres what the copy holds and Postgres lacks, before anything
is stored from a replay (``workers.ops.replay``) and by a worker before its first batch
(``workers.consumer.pipeline``): the erasure's row and its digests (an affiliate's: its
row, and the affiliate scrubbed again); then, behind the ledger's fence, every event row
they name that still holds personal data is scrubbed (``erasure_late.recheck``), and the
erasure is pending again in Redis and the archive for the sweep. A copy made under another
salt (a database made anew, not restored) names nobody there: it is left as it is, and
logged.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog

from ingest.contract import erasure
from ingest.contract.connections import Command, Redis
from ingest.contract.keys import Keys
from ingest.privacy import erasure_affiliate, erasure_late

log = structlog.get_logger("erasure.copy")


def key(keys: Keys) -> str:
    return f"{keys.prefix}:erasure:ledger"


def _salt_check(salt: bytes) -> str:
    """Which salt the copy's digests are under, without the salt."""
    return hashlib.blake2b(salt, digest_size=8, person=b"saltcheck").hexdigest()


_ROWS = """
SELECT e.id, e.workspace_id::text AS ws, e.subject, e.requested_at, e.requested_by, e.since, e.archive_due,
       array(SELECT i.digest FROM erased_ids i WHERE i.erasure_id = e.id AND i.workspace_id = e.workspace_id
             ORDER BY i.digest) AS digests,
       array(SELECT i.kind FROM erased_ids i WHERE i.erasure_id = e.id AND i.workspace_id = e.workspace_id
             ORDER BY i.digest) AS kinds,
       array(SELECT i.workspace_id::text FROM erased_ids i WHERE i.erasure_id = e.id
             AND i.workspace_id = e.workspace_id ORDER BY i.digest) AS spaces
FROM erasures e WHERE e.id = ANY($1::uuid[])
"""


async def commands(conn: asyncpg.Connection, keys: Keys, ids: Iterable[uuid.UUID]) -> list[Command]:
    """The HSETs that copy the erasures ``ids`` as the ledger holds them now."""
    wanted = sorted(set(ids), key=str)
    if not wanted:
        return []
    check = _salt_check(await erasure.salt(conn))
    out: list[Command] = []
    for r in await conn.fetch(_ROWS, wanted):
        doc = {
            "id": str(r["id"]),
            "workspace_id": r["ws"],
            "subject": bytes(r["subject"]).hex(),
            "requested_at": r["requested_at"].isoformat(),
            "requested_by": r["requested_by"],
            "since": r["since"].isoformat() if r["since"] else None,
            "archive_due": r["archive_due"].isoformat(),
            "ids": [[bytes(d).hex(), k, w] for d, k, w in zip(r["digests"], r["kinds"], r["spaces"], strict=True)],
            "salt": check,
        }
        out.append(("HSET", key(keys), str(r["id"]), orjson.dumps(doc)))
    return out


async def keep(pool: asyncpg.Pool, redis: Redis, keys: Keys, ids: Iterable[uuid.UUID]) -> int:
    """Copy the erasures ``ids`` to Redis; how many."""
    async with pool.acquire() as conn:
        todo = await commands(conn, keys, ids)
    for command in todo:
        await redis.execute_command(*command)
    return len(todo)


_RESTORE_ROW = """
INSERT INTO erasures (id, workspace_id, subject, requested_at, requested_by, since, archive_due)
SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM workspaces WHERE id = $2)
ON CONFLICT DO NOTHING
RETURNING id
"""
_RESTORE_IDS = """
INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id)
SELECT d, $1, k, w FROM unnest($2::bytea[], $3::text[], $4::uuid[]) AS x(d, k, w)
WHERE EXISTS (SELECT 1 FROM workspaces WHERE id = w)
ON CONFLICT (digest, workspace_id) DO NOTHING
RETURNING digest
"""
_AGAIN = """
UPDATE erasures SET since = least(since, $2), postgres_at = NULL, redis_at = NULL, archive_at = NULL,
    generation = generation + 1
WHERE id = $1
"""


async def restore(
    pool: asyncpg.Pool, redis: Redis, keys: Keys, here: Callable[[str], Awaitable[bool]] | None = None
) -> int:
    """Put back into Postgres what the copy holds and Postgres lacks, then scrub the rows
    it names (the module's doc). The erasures restored (or given back digests). With
    several shards, ``pool`` is one of them, and ``here`` says which workspaces are on it:
    an erasure is restored only where its workspace's rows are."""
    held: dict[Any, Any] = await redis.hgetall(key(keys))  # type: ignore[misc]
    docs = []
    for field_, raw in held.items():
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict) or not {"id", "workspace_id", "subject", "ids"} <= doc.keys():
                raise ValueError("not an erasure's copy")
        except (orjson.JSONDecodeError, ValueError):  # written by no refstream: it names nobody
            log.warning("erasure.copy_unreadable", field=str(field_)[:64])
            continue
        # where each workspace is, asked before a connection of ``pool`` is held: the
        # directory's reads may need one of the same pool (``ingest.ledger.placement``)
        if here is None or await here(str(doc["workspace_id"])):
            docs.append(doc)
    if not docs:
        return 0
    restored: dict[uuid.UUID, tuple[str, datetime | None]] = {}  # erasure -> (its workspace, since)
    async with pool.acquire() as conn:
        salt = await erasure.salt(conn)
        for doc in docs:
            if doc.get("salt") != _salt_check(salt):
                log.warning("erasure.copy_foreign", erasure_id=doc.get("id"))
                continue
            since = datetime.fromisoformat(doc["since"]) if doc["since"] else None
            async with conn.transaction():
                made = await conn.fetchval(
                    _RESTORE_ROW,
                    uuid.UUID(doc["id"]),
                    uuid.UUID(doc["workspace_id"]),
                    bytes.fromhex(doc["subject"]),
                    datetime.fromisoformat(doc["requested_at"]),
                    doc["requested_by"],
                    since,
                    datetime.fromisoformat(doc["archive_due"]),
                )
                # the row that stands for the person (a second erasure of theirs kept its own id)
                at = await conn.fetchval(
                    "SELECT id FROM erasures WHERE workspace_id = $1 AND subject = $2",
                    uuid.UUID(doc["workspace_id"]),
                    bytes.fromhex(doc["subject"]),
                )
                if at is None:  # its workspace is gone: nothing of it to scrub
                    continue
                ids = doc["ids"]
                if made is not None and not ids:  # an affiliate's (a customer's has its external id's digest)
                    await erasure_affiliate.again(conn, salt, doc["workspace_id"], bytes.fromhex(doc["subject"]))
                    log.warning("erasure.restored", erasures=1)
                    continue
                # an entry is its workspace's (a copy from before the ledger was per workspace: the erasure's)
                spaces = [uuid.UUID(i[2] if len(i) > 2 else doc["workspace_id"]) for i in ids]
                added = await conn.fetch(
                    _RESTORE_IDS, at, [bytes.fromhex(i[0]) for i in ids], [i[1] for i in ids], spaces
                )
                if added:
                    await conn.execute(_AGAIN, at, since)
                    restored[at] = (doc["workspace_id"], since)
    if not restored:
        return 0
    log.warning("erasure.restored", erasures=len(restored))  # Postgres had lost them: a restore, a failover
    earliest: dict[str, datetime] = {}  # per workspace: behind the fence, every row they name that still holds
    for ws, since in restored.values():  # personal data
        if since is not None:
            earliest[ws] = min(since, earliest.get(ws, since))
    for ws, since in sorted(earliest.items()):
        await erasure_late.recheck(pool, salt, ws, since)
    await pool.execute("UPDATE erasures SET postgres_at = now() WHERE id = ANY($1::uuid[])", list(restored))
    return len(restored)
