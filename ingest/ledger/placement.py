"""Where each workspace's rows are: the shards (Postgres primaries, each a complete
refstream database) and the map from workspace to shard, kept in the directory, which is
``DATABASE_URL``'s database and itself the shard named ``default``.

Every row is one workspace's, so every write stays a local transaction on the workspace's
shard. A workspace with no row in ``workspace_shards`` is on ``default``: a deployment
that never ran ``refstream shards add`` reads no map and behaves as one Postgres did. What
a process knows of the map is at most ``REFRESH_S`` old, and a workspace it does not know
is read again from the directory before it is routed: a workspace's placement is written
before its first row (``place``), so nothing of a workspace can reach a process that
could route it to a shard it is not on. docs/shards.md says what holds across shards.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from ingest.contract.connections import create_pg_pool
from ingest.contract.errors import Misconfigured, Outage
from ingest.ledger import secretbox

DEFAULT = "default"
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
REFRESH_S = 2.0  # the longest a process routes by a map it has not read again
FENCE_WAIT_S = 15.0  # the longest a request waits on a moving workspace's fence, then 503
FENCE_POLL_S = 0.2

T = TypeVar("T")
Connect = Callable[[str], Awaitable[asyncpg.Pool]]


def fence_key(workspace_id: UUID | str) -> str:
    """The advisory lock a write of the workspace's rows holds shared, and a move's fence
    exclusive (``hashtextextended`` of it)."""
    return f"refstream:workspace:{workspace_id}"


# a write of workspaces' rows on a shard of several, in its transaction: their fence locks
# held shared (a move's fence waits for the transaction), then, in a statement of its own
# (a snapshot taken after the locks), whether any of them has moved away (``Moved``)
FENCE_LOCK = (
    "SELECT count(pg_advisory_xact_lock_shared(hashtextextended('refstream:workspace:' || x, 0)))"
    " FROM unnest($1::uuid[]) x"
)
FENCE_MOVED = "SELECT id FROM workspaces WHERE id = ANY($1::uuid[]) AND moved_to IS NOT NULL"


class Moved(Outage):
    """A write met the fence of a workspace that is moving, or has moved, to another shard:
    retried once the directory says where it is (``workers.ops.move``)."""

    def __init__(self, message: str, workspaces: list[str] | None = None) -> None:
        super().__init__(message)
        self.workspaces = workspaces or []


class ShardError(Misconfigured, ValueError):
    """A shard that cannot be named, added or reached as asked: the operator's to mend."""


@dataclass(frozen=True, slots=True)
class Shard:
    name: str
    dsn: str  # without its password: what listings show
    sealed: bytes | None = None  # the password, sealed under REFSTREAM_SECRET_KEY


def split_password(dsn: str) -> tuple[str, str | None]:
    """``dsn`` without its password, and the password (None if it has none)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ShardError("a shard's DSN is a URL such as postgresql://user@host:5432/refstream")
    if parts.password is None:
        return dsn, None
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host)), unquote(parts.password)


def with_password(dsn: str, password: str | None) -> str:
    """``dsn`` with ``password`` put back, for the connection alone (never shown, never logged)."""
    if password is None:
        return dsn
    parts = urlsplit(dsn)
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def check_name(name: str) -> str:
    if name == DEFAULT or not NAME.match(name):
        raise ShardError(f"a shard's name is 1-40 of a-z, 0-9, '-' and '_', starting with a letter; not {DEFAULT!r}")
    return name


class Placement:
    """The shards' pools and the map from workspace to shard, as this process last read
    them from the directory (``directory``, the pool of ``DATABASE_URL``)."""

    def __init__(self, directory: asyncpg.Pool, connect: Connect, secret_key: str | None) -> None:
        self.directory = directory
        self._connect = connect
        self._secret_key = secret_key
        self._shards: dict[str, Shard] = {}
        self._where: dict[UUID, str] = {}
        self._fenced: set[UUID] = set()  # workspaces being moved: their pool waits
        self._pools: dict[str, asyncpg.Pool] = {DEFAULT: directory}
        self._read_at = -REFRESH_S  # monotonic time of the last read
        self._reading: asyncio.Lock | None = None

    @classmethod
    def over(cls, settings: Any, directory: asyncpg.Pool, *, max_size: int | None = None) -> Placement:
        """A placement whose shards' pools are made as ``directory`` was (``settings``'s
        pool settings; ``max_size`` connections each)."""

        async def connect(url: str) -> asyncpg.Pool:
            return await create_pg_pool(
                settings.model_copy(update={"database_url": url}), min_size=0, max_size=max_size
            )

        return cls(directory, connect, settings.secret_key)

    @property
    def sharded(self) -> bool:
        """Whether the directory, as last read, lists a shard beside ``default``."""
        return bool(self._shards)

    @property
    def names(self) -> list[str]:
        """Every shard's name, ``default`` first, as last read."""
        return [DEFAULT, *sorted(self._shards)]

    async def read(self) -> None:
        """The directory read again: its shards, and where each workspace is."""
        started = time.monotonic()
        async with self.directory.acquire() as conn:
            shards = await conn.fetch("SELECT name, dsn, password_sealed FROM shards")
            where = await conn.fetch("SELECT workspace_id, shard, fenced FROM workspace_shards") if shards else []
        self._shards = {r["name"]: Shard(r["name"], r["dsn"], r["password_sealed"]) for r in shards}
        self._where = {r["workspace_id"]: r["shard"] for r in where}
        self._fenced = {r["workspace_id"] for r in where if r["fenced"]}
        self._read_at = started

    async def fresh(self, *, since: float | None = None) -> None:
        """The map read again if older than ``REFRESH_S`` (or than ``since``); one read at
        a time, and a read that began after ``since`` serves every caller waiting on it."""
        want = since if since is not None else time.monotonic() - REFRESH_S
        if self._read_at >= want:
            return
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            if self._read_at < want:
                await self.read()

    async def shard_of(self, workspace_id: str | UUID | None) -> str:
        """The shard ``workspace_id`` is on (``default`` for None, or for a workspace the
        directory does not place)."""
        await self.fresh()
        if not self._shards or workspace_id is None:
            return DEFAULT
        ws = workspace_id if isinstance(workspace_id, UUID) else _uuid(workspace_id)
        if ws is None:
            return DEFAULT
        shard = self._where.get(ws)
        if shard is None:
            asked = time.monotonic()
            await self.fresh(since=asked)  # placed after our last read: read again, once
            shard = self._where.setdefault(ws, DEFAULT)
        return shard

    def fenced(self, workspace_id: str | UUID | None) -> bool:
        """Whether the directory, as last read, fences ``workspace_id`` for a move."""
        if not self._fenced or workspace_id is None:
            return False
        return (workspace_id if isinstance(workspace_id, UUID) else _uuid(workspace_id)) in self._fenced

    async def pool(self, workspace_id: str | UUID | None) -> asyncpg.Pool:
        """The pool of the shard ``workspace_id`` is on; while it is being moved, once it
        has moved (``FENCE_WAIT_S`` at most, then ``Moved``)."""
        shard = await self.shard_of(workspace_id)
        if self._fenced:
            ws = workspace_id if isinstance(workspace_id, UUID) else _uuid(workspace_id or "")
            deadline = time.monotonic() + FENCE_WAIT_S
            while ws in self._fenced:
                if time.monotonic() > deadline:
                    raise Moved("the workspace is being moved to another shard: try again shortly")
                await asyncio.sleep(FENCE_POLL_S)  # a poll of the directory, which says when it is over
                await self.fresh(since=time.monotonic())
                shard = await self.shard_of(workspace_id)
        return await self.pool_of(shard)

    async def pool_of(self, name: str) -> asyncpg.Pool:
        """The pool of the shard ``name``, opened on first use."""
        pool = self._pools.get(name)
        if pool is not None:
            return pool
        shard = self._shards.get(name)
        if shard is None:
            await self.fresh(since=time.monotonic())
            shard = self._shards.get(name)
            if shard is None:
                raise ShardError(f"no shard named {name!r}: `refstream shards list` shows them")
        password = secretbox.decrypt(self._secret_key, shard.sealed) if shard.sealed is not None else None
        pool = await self._connect(with_password(shard.dsn, password))
        return self._pools.setdefault(name, pool)

    async def pools(self) -> dict[str, asyncpg.Pool]:
        """Every shard's pool, by name, ``default`` first: what a read of everything fans out to."""
        await self.fresh()
        return {name: await self.pool_of(name) for name in self.names}

    async def split(self, items: Iterable[T], workspace: Callable[[T], str | UUID | None]) -> dict[str, list[T]]:
        """``items`` by the shard of each one's workspace, in their order; one list, under
        ``default``, while there is one shard."""
        await self.fresh()
        listed = list(items)
        if not self._shards:
            return {DEFAULT: listed} if listed else {}
        parts: dict[str, list[T]] = {}
        for item in listed:
            parts.setdefault(await self.shard_of(workspace(item)), []).append(item)
        return parts

    async def each(self, fn: Callable[[asyncpg.Pool], Awaitable[T]]) -> dict[str, T]:
        """``fn`` on every shard's pool in turn, by shard name: a chore or a read of
        everything. A shard that fails raises (after the ones before it ran)."""
        return {name: await fn(pool) for name, pool in (await self.pools()).items()}

    async def find(
        self, fn: Callable[[asyncpg.Pool], Awaitable[T | None]], owner: Callable[[T], Any] | None = None
    ) -> tuple[str, T] | None:
        """The first shard where ``fn`` finds something (not None), and what: a lookup by an
        id unique across shards (a key's digest, a click id, a delivery id). With ``owner``
        (what found's workspace is), only where the directory places that workspace: a moved
        workspace's old copy, until dropped, answers nothing."""
        pools = await self.pools()
        for name, pool in pools.items():
            found = await fn(pool)
            if found is None:
                continue
            if owner is None or len(pools) == 1 or await self.shard_of(owner(found)) == name:
                return name, found
        return None

    async def claim_code(self, code: str, workspace_id: str) -> bool:
        """Whether ``code`` may be a new link of ``workspace_id``: with one shard, its own
        unique index decides; with several, the directory's ``link_codes`` too, claimed here
        for good (a claim whose link was never committed keeps the code for its workspace)."""
        await self.fresh()
        return not self._shards or await claim_code(self.directory, code, workspace_id, sharded=True)

    async def close(self) -> None:
        """Close the pools this placement opened (the directory's is its owner's)."""
        opened = [p for name, p in self._pools.items() if name != DEFAULT]
        self._pools = {DEFAULT: self.directory}
        await asyncio.gather(*(p.close() for p in opened), return_exceptions=True)


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


# ---- the directory's writes (the `refstream shards` and `workspace` commands) ----


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


async def claim_code(
    directory: asyncpg.Connection | asyncpg.Pool, code: str, workspace_id: str, *, sharded: bool | None = None
) -> bool:
    """``Placement.claim_code`` on a connection to the directory (a command's)."""
    if sharded is None:
        sharded = bool(await directory.fetchval("SELECT EXISTS (SELECT 1 FROM shards)"))
    if not sharded:
        return True
    owner = await directory.fetchval(
        "WITH c AS (INSERT INTO link_codes (code, workspace_id) VALUES ($1, $2)"
        " ON CONFLICT (code) DO NOTHING RETURNING workspace_id)"
        " SELECT workspace_id FROM c UNION ALL SELECT workspace_id FROM link_codes WHERE code = $1 LIMIT 1",
        code,
        _uuid(workspace_id),
    )
    return owner is not None and str(owner) == str(workspace_id)  # None: claimed beside us


async def shard_dsn_of(directory: asyncpg.Connection, workspace_id: str, secret_key: str | None) -> str | None:
    """The DSN of the shard ``workspace_id`` is on, its password put back; None for the
    directory's own database (``default``, or a workspace the directory does not place)."""
    ws = _uuid(workspace_id)
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
