"""The directory's own reads and writes, for the commands (``refstream shards``,
``workspace create``, ``workspace move``, ``migrate``): shards added and listed, where a
new workspace goes, a workspace placed, fenced or forgotten, a link's code claimed; what
the processes route by is ``ingest.ledger.placement``."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from ingest.ledger import secretbox
from ingest.ledger.placement import DEFAULT, Shard, ShardError, as_uuid, check_name, split_password, with_password


async def add_shard(directory: asyncpg.Connection, name: str, dsn: str, secret_key: str | None) -> Shard:
    """Register the shard ``name`` at ``dsn`` (migrated by its caller first). The first one
    added also writes down where every existing workspace is (``default``), so that from
    then on every workspace has its row."""
    check_name(name)
    public, password = split_password(dsn)
    sealed = secretbox.encrypt(secret_key, password) if password is not None else None
    async with directory.transaction():
        taken = await directory.fetchval("SELECT dsn FROM shards WHERE name = $1", name)
        if taken is not None and taken != public:
            raise ShardError(f"shard {name!r} is already at another DSN")
        await directory.execute(
            "INSERT INTO shards (name, dsn, password_sealed) VALUES ($1, $2, $3)"
            " ON CONFLICT (name) DO UPDATE SET password_sealed = EXCLUDED.password_sealed",
            name,
            public,
            sealed,
        )
        await directory.execute(
            "INSERT INTO workspace_shards (workspace_id, shard) SELECT id, $1 FROM workspaces"
            " ON CONFLICT (workspace_id) DO NOTHING",
            DEFAULT,
        )
        await directory.execute(
            "INSERT INTO link_codes (code, workspace_id) SELECT code, workspace_id FROM links ON CONFLICT DO NOTHING"
        )
    return Shard(name, public, sealed)


async def share_salt(directory: asyncpg.Connection, shard: asyncpg.Connection) -> None:
    """The erasure ledger's salt of ``shard`` made the directory's, so that a digest means
    the same person on every shard and moves with its workspace unchanged; refused for a
    database whose ledger already holds digests under another salt (in use elsewhere)."""
    salt = await directory.fetchval("SELECT salt FROM erasure_salt")
    async with shard.transaction():
        theirs = await shard.fetchval("SELECT salt FROM erasure_salt FOR UPDATE")
        if theirs == salt:
            return
        if await shard.fetchval("SELECT EXISTS (SELECT 1 FROM erasures)"):  # a ledger of its own
            raise ShardError("this database's erasure ledger holds digests under another salt: it is in use elsewhere")
        await shard.execute("UPDATE erasure_salt SET salt = $1", salt)


async def shard_dsn_of(directory: asyncpg.Connection, workspace_id: str, secret_key: str | None) -> str | None:
    """The DSN of the shard ``workspace_id`` is on, its password put back; None for the
    directory's own database (``default``, or a workspace the directory does not place)."""
    ws = as_uuid(workspace_id)
    shard = await directory.fetchval("SELECT shard FROM workspace_shards WHERE workspace_id = $1", ws) if ws else None
    if shard is None or shard == DEFAULT:
        return None
    return (await shard_dsns(directory, secret_key))[shard]


async def list_shards(directory: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every shard, ``default`` first, with its DSN (no password) and its workspaces' count."""
    rows = await directory.fetch(
        "SELECT s.name, s.dsn, s.added_at, (SELECT count(*) FROM workspace_shards w WHERE w.shard = s.name) AS n"
        " FROM shards s ORDER BY s.name"
    )
    placed = await directory.fetchval("SELECT count(*) FROM workspace_shards WHERE shard = $1", DEFAULT)
    unplaced = await directory.fetchval(
        "SELECT count(*) FROM workspaces w"
        " WHERE NOT EXISTS (SELECT 1 FROM workspace_shards p WHERE p.workspace_id = w.id)"
    )
    first = {"name": DEFAULT, "dsn": "DATABASE_URL", "workspaces": placed + unplaced, "added_at": None}
    return [
        first,
        *({"name": r["name"], "dsn": r["dsn"], "workspaces": r["n"], "added_at": r["added_at"]} for r in rows),
    ]


async def choose(directory: asyncpg.Connection, asked: str | None) -> str:
    """The shard a new workspace goes to: ``asked``, else the one with the fewest
    workspaces (ties to ``default``, then by name). A workspace is the unit of placement;
    its size is not known when it is made, and ``workspace move`` evens out what the rule
    could not foresee."""
    listed = await list_shards(directory)
    if asked is not None:
        if asked not in {s["name"] for s in listed}:
            raise ShardError(f"no shard named {asked!r}: `refstream shards list` shows them")
        return asked
    least: str = min(listed, key=lambda s: (s["workspaces"], s["name"] != DEFAULT, s["name"]))["name"]
    return least


async def fence(directory: asyncpg.Connection, workspace_id: UUID, fenced: bool, shard: str | None = None) -> None:
    """A moving workspace fenced (every process asking for its pool waits), or its fence
    lifted, placed on ``shard`` when one is given (the move's switch), in one statement."""
    await directory.execute(
        "INSERT INTO workspace_shards (workspace_id, shard, fenced) VALUES ($1, coalesce($3, $4), $2)"
        " ON CONFLICT (workspace_id) DO UPDATE SET fenced = $2, shard = coalesce($3, workspace_shards.shard)",
        workspace_id,
        fenced,
        shard,
        DEFAULT,
    )


async def forget(directory: asyncpg.Connection, workspace_id: UUID) -> None:
    """A deleted workspace's placement and link codes, gone from the directory."""
    async with directory.transaction():
        await directory.execute("DELETE FROM link_codes WHERE workspace_id = $1", workspace_id)
        await directory.execute("DELETE FROM workspace_moves WHERE workspace_id = $1", workspace_id)
        await directory.execute("DELETE FROM workspace_shards WHERE workspace_id = $1", workspace_id)


async def place(directory: asyncpg.Connection, workspace_id: UUID, shard: str) -> None:
    """Write down that ``workspace_id`` is on ``shard``: before its first row is written
    there, so no process can meet its rows and route them elsewhere."""
    await directory.execute(
        "INSERT INTO workspace_shards (workspace_id, shard) VALUES ($1, $2)"
        " ON CONFLICT (workspace_id) DO UPDATE SET shard = EXCLUDED.shard",
        workspace_id,
        shard,
    )


async def shard_dsns(directory: asyncpg.Connection, secret_key: str | None) -> dict[str, str]:
    """Every added shard's DSN, its password put back, by name (``default`` not among them):
    for a command that connects to each shard in turn."""
    rows = await directory.fetch("SELECT name, dsn, password_sealed FROM shards ORDER BY name")
    return {
        r["name"]: with_password(
            r["dsn"], secretbox.decrypt(secret_key, r["password_sealed"]) if r["password_sealed"] else None
        )
        for r in rows
    }
