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
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import structlog

from ingest.contract.connections import acquired, create_pg_pool
from ingest.contract.errors import Misconfigured
from ingest.contract.events import Envelope

# the fence every writer checks, re-exported: where a write is routed, there its fence is
from ingest.contract.fence import FENCE_LOCK as FENCE_LOCK
from ingest.contract.fence import FENCE_MOVED as FENCE_MOVED
from ingest.contract.fence import FENCE_NOT_HERE as FENCE_NOT_HERE
from ingest.contract.fence import Moved as Moved
from ingest.contract.fence import fence_key as fence_key
from ingest.ledger import secretbox

DEFAULT = "default"
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
REFRESH_S = 2.0  # the longest a process routes by a map it has not read again
FENCE_WAIT_S = 15.0  # the longest a request waits on a moving workspace's fence, then 503
FENCE_POLL_S = 0.2

T = TypeVar("T")
log = structlog.get_logger("ingest.placement")
Connect = Callable[[str], Awaitable[asyncpg.Pool]]


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

    def __init__(
        self, directory: asyncpg.Pool, connect: Connect, secret_key: str | None, directory_url: str | None = None
    ) -> None:
        self.directory = directory
        self._urls: dict[str, str] = {DEFAULT: directory_url} if directory_url else {}
        self._connect = connect
        self._secret_key = secret_key
        self._shards: dict[str, Shard] = {}
        self._where: dict[UUID, str] = {}
        self._fenced: set[UUID] = set()  # workspaces being moved: their pool waits
        self._pools: dict[str, asyncpg.Pool] = {DEFAULT: directory}
        self._guards: dict[str, asyncpg.Pool] = {}  # a connection each write holds its fence lock on
        self._own: asyncpg.Pool | None = None  # the directory's, for the map's reads and a code's claims
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

        return cls(directory, connect, settings.secret_key, settings.database_url)

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
        async with (await self._directory()).acquire() as conn:
            shards = await conn.fetch("SELECT name, dsn, password_sealed FROM shards")
            where = await conn.fetch("SELECT workspace_id, shard, fenced FROM workspace_shards") if shards else []
        self._shards = {r["name"]: Shard(r["name"], r["dsn"], r["password_sealed"]) for r in shards}
        self._where = {r["workspace_id"]: r["shard"] for r in where}
        self._fenced = {r["workspace_id"] for r in where if r["fenced"]}
        self._read_at = started

    async def _directory(self) -> asyncpg.Pool:
        """The directory on connections of the placement's own, never of its owner's pool
        (the ``default`` shard's): a caller may hold a connection of that pool while it asks
        where a workspace is, and callers holding every one of them, each waiting for another
        to read the map, waited for ever (a worker's partitions restoring the erasure ledger
        at once after an outage: generative seed 1789722521). The owner's pool while the map
        lists no other shard (nothing then asks it while holding a connection: one pool, no
        question of where a workspace is), or where the directory's URL is not known."""
        if self._own is None:
            if not self._shards or DEFAULT not in self._urls:
                return self.directory
            pool = await self._connect(self._urls[DEFAULT])
            if self._own is None:
                self._own = pool
            else:  # another caller opened one meanwhile
                await pool.close()
        return self._own

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
        ws = workspace_id if isinstance(workspace_id, UUID) else as_uuid(workspace_id)
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
        return (workspace_id if isinstance(workspace_id, UUID) else as_uuid(workspace_id)) in self._fenced

    async def pool(self, workspace_id: str | UUID | None) -> asyncpg.Pool:
        """The pool of the shard ``workspace_id`` is on; while it is being moved, once it
        has moved (``FENCE_WAIT_S`` at most, then ``Moved``)."""
        shard = await self.shard_of(workspace_id)
        if self._fenced:
            ws = workspace_id if isinstance(workspace_id, UUID) else as_uuid(workspace_id or "")
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
        self._urls[name] = with_password(shard.dsn, password)
        pool = await self._connect(self._urls[name])
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

    async def workspaces_of(self, events: Sequence[Envelope]) -> list[str | None]:
        """Each event's workspace. An event the edge took while it could not resolve its link
        carries its code alone: the directory's claim of the code says whose it is (``owners``;
        a code no one claimed, or one shard: None)."""
        codes = [c if e.workspace_id is None and isinstance(c := e.payload.get("code"), str) else None for e in events]
        owners = await self.owners(c for c in codes if c) if any(codes) else {}
        return [e.workspace_id or (owners.get(c) if c else None) for e, c in zip(events, codes, strict=True)]

    async def by_pool(self, events: Sequence[Envelope]) -> dict[asyncpg.Pool, list[int]]:
        """The indexes of ``events`` by the pool of the shard each one's workspace is on
        (``workspaces_of``: as the workers place them; none: ``default``'s), a moving
        workspace's its source's until the switch: where a reader of each one's rows (the
        erasure ledger's) goes."""
        workspaces = await self.workspaces_of(events)
        parts = await self.split(range(len(events)), lambda i: workspaces[i])
        return {await self.pool_of(name): indexes for name, indexes in parts.items()}

    @contextlib.asynccontextmanager
    async def writing(self, workspace_id: str) -> AsyncIterator[None]:
        """Around a write of ``workspace_id``'s rows outside the workers (the management
        API's): with several shards, its fence lock held shared on its shard, on a
        connection of its own, and the workspace found not moved away there; a move's fence
        waits for it to end (``workers.ops.move``). ``Moved`` if it keeps moving."""
        await self.fresh()
        if not self._shards:
            yield
            return
        for _ in range(3):
            shard = await self.shard_of(workspace_id)
            await self.pool(workspace_id)  # waits out a fence the directory shows
            guard = await self._guard(shard)
            async with acquired(guard) as conn:  # its release's failure is not the write's outcome
                await conn.execute("SELECT pg_advisory_lock_shared(hashtextextended($1, 0))", fence_key(workspace_id))
                try:
                    moved = await conn.fetchval(
                        "SELECT moved_to IS NOT NULL FROM workspaces WHERE id = $1", as_uuid(workspace_id)
                    )
                    if not moved:
                        yield
                        return
                finally:
                    try:  # the write's outcome is the handler's: a lost session drops its lock itself
                        await conn.execute(
                            "SELECT pg_advisory_unlock_shared(hashtextextended($1, 0))", fence_key(workspace_id)
                        )
                    except Exception:
                        # lost with its server: the pool let the connection go as it saw it
                        # close, and terminate() then raises; its session's lock went with it
                        # (the generative test's ``refused_write_kept``, seed 1572826553)
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()
            await self.fresh(since=time.monotonic())  # moved since our read: where is it now
        raise Moved("the workspace is being moved to another shard: try again shortly", [str(workspace_id)])

    async def _guard(self, shard: str) -> asyncpg.Pool:
        pool = self._guards.get(shard)
        if pool is None:
            await self.pool_of(shard)  # its URL, read and opened
            if shard not in self._urls:
                raise ShardError(f"no URL known for shard {shard!r}")
            pool = self._guards.setdefault(shard, await self._connect(self._urls[shard]))
        return pool

    async def each(self, fn: Callable[[asyncpg.Pool], Awaitable[T]], *, every: bool = False) -> dict[str, T]:
        """``fn`` on every shard's pool in turn, by shard name: a chore or a read of
        everything. A shard that fails raises (after the ones before it ran). ``every`` (a
        chore, as the workers' crons): the shards after a failed one run too, and the first
        failure is raised once all have run; one shard's trouble never starves the others
        of the chore (an erasure sweep on a shard whose copy of a workspace moved away)."""
        return await self.each_shard(lambda _, pool: fn(pool), every=every)

    async def each_shard(self, fn: Callable[[str, asyncpg.Pool], Awaitable[T]], *, every: bool = False) -> dict[str, T]:
        """``each``, with ``fn`` given the shard's name beside its pool."""
        if not every:
            return {name: await fn(name, pool) for name, pool in (await self.pools()).items()}
        done, failed = await self.settled(fn)
        if failed is not None:
            raise failed
        return done

    async def settled(self, fn: Callable[[str, asyncpg.Pool], Awaitable[T]]) -> tuple[dict[str, T], Exception | None]:
        """``fn`` on every shard in turn, each whatever the others did: what it returned on
        each that succeeded, by name, and the first failure (None: none); the others
        logged. For a chore whose successes must be acted on before its failure is raised."""
        done: dict[str, T] = {}
        failed: list[tuple[str, Exception]] = []
        for name, pool in (await self.pools()).items():
            try:
                done[name] = await fn(name, pool)
            except Exception as exc:  # the caller's, once every shard has run
                failed.append((name, exc))
        for name, error in failed[1:]:
            log.warning("placement.each_failed", shard=name, error=type(error).__name__)
        return done, (failed[0][1] if failed else None)

    async def find(
        self, fn: Callable[[asyncpg.Pool], Awaitable[T | None]], owner: Callable[[T], Any] | None = None
    ) -> tuple[str, T] | None:
        """The first shard where ``fn`` finds something (not None), and what: a lookup by an
        id unique across shards (a key's digest, a click id, a delivery id). With ``owner``
        (what found's workspace is), only where the directory places that workspace: a moved
        workspace's old copy, until dropped, answers nothing. Found only where the map, as
        last read, does not place its workspace: the map is read again, and the search made
        once more (a move switched and its old copy dropped within ``REFRESH_S``: the stale
        map's shard has it no more, and the new one's was passed over; seed 562805026). A
        shard that fails is passed over too: found on another, it is found; found nowhere,
        the failure is raised, never "not found" (one shard down failed the lookups of every
        shard after it)."""
        failed: Exception | None = None
        for again in (False, True):
            pools, passed, failed = await self.pools(), False, None
            for name, pool in pools.items():
                try:
                    found = await fn(pool)
                except Exception as exc:  # it may be on another: raised if found nowhere
                    failed = failed or exc
                    continue
                if found is None:
                    continue
                if owner is None or len(pools) == 1 or await self.shard_of(owner(found)) == name:
                    return name, found
                passed = True
            if not passed or again:
                break
            await self.fresh(since=time.monotonic())
        if failed is not None:
            raise failed
        return None

    async def owners(self, codes: Iterable[str]) -> dict[str, str]:
        """The workspace of each link code the directory has claimed (an event the edge took
        while it could not resolve its link carries its code alone): with one shard, none."""
        await self.fresh()
        wanted = sorted({c for c in codes if c})
        if not self._shards or not wanted:
            return {}
        rows = await (await self._directory()).fetch(
            "SELECT code, workspace_id::text AS ws FROM link_codes WHERE code = ANY($1::text[])", wanted
        )
        return {r["code"]: r["ws"] for r in rows}

    async def claim_code(self, code: str, workspace_id: str) -> bool:
        """Whether ``code`` may be a new link of ``workspace_id``: with one shard, its own
        unique index decides; with several, the directory's ``link_codes`` too, claimed here
        for good (a claim whose link was never committed keeps the code for its workspace)."""
        await self.fresh()
        if not self._shards:
            return True
        if DEFAULT not in self._urls:  # not the directory's own pool: its caller may hold one of it
            raise ShardError("the directory's URL is not known: a code cannot be claimed")
        return await claim_code(await self._directory(), code, workspace_id, sharded=True)

    async def close(self) -> None:
        """Close the pools this placement opened (the directory's is its owner's)."""
        opened = [p for name, p in self._pools.items() if name != DEFAULT] + list(self._guards.values())
        opened += [self._own] if self._own is not None else []
        self._pools, self._guards, self._own = {DEFAULT: self.directory}, {}, None
        await asyncio.gather(*(p.close() for p in opened), return_exceptions=True)


def as_uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


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
        as_uuid(workspace_id),
    )
    return owner is not None and str(owner) == str(workspace_id)  # None: claimed beside us
