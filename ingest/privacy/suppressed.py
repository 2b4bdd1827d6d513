"""A process's view of the do-not-track lists (``ingest.contract.suppression``), as an edge
and an import keep it: per workspace, a filter of the digests' fingerprints (8 bytes an
entry, in one sorted array; a list of 300,000 entries is 2.4 MB, where a set of the digests
held 106 bytes an entry), read from Postgres at the start; then, every
``REFSTREAM_SUPPRESSION_REFRESH_S``, only the changes logged after the last one read
(``suppression_changes``, numbered in commit order: schema.sql, version 22). A refresh
costs what changed, never every list again; every list is read again only when the log was
pruned past the last change read (a process away from Postgres for a day).

An event whose workspace lists nothing costs a dictionary look; one whose workspace lists
something, a digest and a binary search per identifier it carries. While Postgres is away
the last lists read stay in force; before the first read, nothing is suppressed."""

from __future__ import annotations

import asyncio
import heapq
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from typing import Protocol

import asyncpg
import structlog

from ingest.contract import background, suppression
from ingest.contract.connections import PG_ERRORS, cancelled_meanwhile
from ingest.contract.events import Envelope

log = structlog.get_logger("ingest.suppressed")

CHANGES_PAGE = 5_000  # changes read in one statement
MERGE_AT = 4_096  # changes kept beside a workspace's array before it is built again (or an eighth of it)

_ALL = (
    "SELECT workspace_id::text AS ws, string_agg(substring(digest from 1 for 8), ''::bytea ORDER BY digest) AS fps"
    " FROM suppressions {where} GROUP BY workspace_id"
)
_LAST = (
    "SELECT greatest((SELECT seq FROM suppression_horizon), (SELECT coalesce(max(seq), 0) FROM suppression_changes))"
)
_HORIZON = "SELECT seq FROM suppression_horizon"
_CHANGES = (
    "SELECT seq, workspace_id::text AS ws, substring(digest from 1 for 8) AS fp, listed FROM suppression_changes"
    " WHERE seq > $1 {where} ORDER BY seq LIMIT {page}"
)


def _sorted(packed: bytes) -> array[int]:
    """Big-endian 8-byte fingerprints, in byte order, as numbers in the same order."""
    out = array("Q", packed)
    if sys.byteorder == "little":
        out.byteswap()
    return out


class Filter:
    """One workspace's list: the fingerprints read at once (sorted), and those listed or
    taken off since, merged into a new array once they are many."""

    __slots__ = ("added", "base", "removed")

    def __init__(self, base: array[int] | None = None) -> None:
        self.base: array[int] = base if base is not None else array("Q")
        self.added: set[int] = set()
        self.removed: set[int] = set()

    def _in_base(self, fp: int) -> bool:
        i = bisect_left(self.base, fp)
        return i < len(self.base) and self.base[i] == fp

    def __contains__(self, fp: object) -> bool:
        if fp in self.added:
            return True
        return isinstance(fp, int) and fp not in self.removed and self._in_base(fp)

    def __len__(self) -> int:
        return len(self.base) - len(self.removed) + len(self.added)

    def list(self, fp: int) -> None:
        if fp in self.removed:
            self.removed.discard(fp)
        elif not self._in_base(fp):
            self.added.add(fp)

    def unlist(self, fp: int) -> None:
        if fp in self.added:
            self.added.discard(fp)
        elif self._in_base(fp):
            self.removed.add(fp)

    def settle(self) -> None:
        """Merge the changes into the array once they are many (a cost in proportion to them)."""
        if len(self.added) + len(self.removed) <= max(MERGE_AT, len(self.base) // 8):
            return
        kept: Iterable[int] = (x for x in self.base if x not in self.removed) if self.removed else self.base
        self.base = array("Q", heapq.merge(kept, sorted(self.added)))
        self.added, self.removed = set(), set()


class Shards(Protocol):
    """Every shard's pool by name (``ingest.ledger.placement.Placement``)."""

    async def pools(self) -> dict[str, asyncpg.Pool]: ...


class Suppressed:
    def __init__(self) -> None:
        self.key: bytes | None = None
        self.lists: dict[str, Filter] = {}
        self.last: int | None = None  # the last change read (None: no list read yet)
        self.only: str | None = None  # one workspace's list (an import), else every one
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        # with several shards, each shard's lists (its workspaces'), read from it alone
        self.shards: dict[str, Suppressed] = {}

    def names(self, e: Envelope, workspace_id: str | None = None) -> bool:
        """``e`` names a listed visitor, customer or address of its workspace."""
        if self.shards:
            return any(s.names(e, workspace_id) for s in self.shards.values())
        ws = e.workspace_id or workspace_id
        listed = self.lists.get(ws) if ws else None
        if not listed or self.key is None:
            return False
        return any(
            suppression.fingerprint(suppression.digest(self.key, ws, k, v)) in listed  # type: ignore[arg-type]
            for k, v in suppression.named(e)
        )

    async def read(self, pool: asyncpg.Pool, *, only: str | None = None) -> None:
        """Every list at the first call (``only``: one workspace's), the changes since after it."""
        if only is not None:
            self.only = only
        async with pool.acquire() as conn:
            if self.key is None:
                found = await conn.fetchval("SELECT salt FROM erasure_salt")
                self.key = bytes(found) if found is not None else None
            if self.last is None or await conn.fetchval(_HORIZON) > self.last:
                await self._read_all(conn)
            else:
                await self._read_changes(conn)

    async def _read_all(self, conn: asyncpg.Connection) -> None:
        where, args = ("WHERE workspace_id = $1", [self.only]) if self.only else ("", [])
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # the lists as of `last`
            last = await conn.fetchval(_LAST)
            rows = await conn.fetch(_ALL.format(where=where), *args)
        self.lists = {r["ws"]: Filter(_sorted(r["fps"])) for r in rows}
        self.last = int(last)

    async def _read_changes(self, conn: asyncpg.Connection) -> None:
        assert self.last is not None
        where, args = ("AND workspace_id = $2", [self.only]) if self.only else ("", [])
        touched: set[str] = set()
        while True:
            rows = await conn.fetch(_CHANGES.format(where=where, page=CHANGES_PAGE), self.last, *args)
            for r in rows:
                fp = suppression.fingerprint(r["fp"])
                f = self.lists.get(r["ws"])
                if f is None:
                    f = self.lists[r["ws"]] = Filter()
                (f.list if r["listed"] else f.unlist)(fp)
                touched.add(r["ws"])
            if rows:
                self.last = int(rows[-1]["seq"])
            for ws in touched:  # each page's: the changes held beside the arrays stay few
                if not self.lists[ws]:
                    del self.lists[ws]
                else:
                    self.lists[ws].settle()
            touched.clear()
            if len(rows) < CHANGES_PAGE:
                break

    def start(self, pool: asyncpg.Pool | Shards, every_s: float) -> None:
        """Read the lists every ``every_s``: from ``pool``, or from every shard of a placement."""
        self._task = asyncio.create_task(self._run(pool, every_s), name="suppressions")

    async def _read_shards(self, placement: Shards) -> None:
        pools = await placement.pools()
        if len(pools) == 1 and not self.shards:
            await self.read(next(iter(pools.values())))  # one Postgres: as it always was
            return
        failed: BaseException | None = None
        for name, pool in pools.items():  # every shard's, past one that cannot be read
            part = self.shards.get(name)
            try:
                if part is None:
                    part = Suppressed()
                    await part.read(pool)
                    self.shards[name] = part  # in force once read whole
                else:
                    await part.read(pool)
            except (*PG_ERRORS, asyncpg.PostgresError) as exc:  # the others' read first
                failed = failed or exc
        if failed is not None:
            raise failed

    async def close(self) -> None:
        await background.stopped(self._task, "suppressions")
        self._task = None

    async def _run(self, pool: asyncpg.Pool, every_s: float) -> None:
        while True:
            try:
                await (self.read(pool) if isinstance(pool, asyncpg.Pool) else self._read_shards(pool))
                if self._failing:
                    log.info("suppressions.read_again", workspaces=len(self.lists))
                self._failing = False
            except (*PG_ERRORS, asyncpg.PostgresError) as exc:
                if not self._failing:
                    log.warning("suppressions.unread", error=exc, kept=len(self.lists))
                self._failing = True
            cancelled_meanwhile()  # a cancel a driver's timeout lost must still end the loop (close awaits it)
            await asyncio.sleep(every_s)  # a period, not a synchronisation
