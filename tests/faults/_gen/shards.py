"""The checker's reads across shards (``ingest.ledger.placement``): the run's workspaces are
placed on ``default`` (the stage's database, the directory) and ``b`` (a database on a
Postgres of its own, ``Cluster.shard_pg``), and moved between them while the run goes on.

Every read the checker makes goes to each shard, and on each sees only the rows of the
workspaces the directory places there at the end (``workspace_shards``): each shard's
tables are shadowed, in the read's own session, by temporary views of the same names
(``pg_temp`` is searched first) holding the rows of those workspaces alone, found as a
move finds them (``workers.ops.move.plan``). So the checker's SQL is the one it ever was,
per shard, and its results are put together: rows listed one after the other (a
workspace's rows are all on one shard), counts summed. A moved workspace's old copy, frozen
on its source until ``--drop-old`` (``workspaces.moved_to`` set), and a copy a move left
half made on its target, are read by no one, as the product reads them: a row of the
workspace written there after the fence would be lost from the checker's view, and seen.

``placement_problems`` holds the directory to what the shards hold: each workspace's row on
its shard, not marked moved; on any other shard, no copy, or the one frozen copy of its
last move, marked moved to where it is, while no ``--drop-old`` ran since.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from ingest.contract.keys import Keys
from workers.ops.move import plan

from .._checks import Checker

DEFAULT = "default"
History = tuple[dict[Any, Any], list[Any], list[Any], list[Any]]  # rules, leads, sales, ledger rows
_OWN = re.compile(r"(\w+) = \$1")  # how a move's plan names one workspace's rows: ``col = $1``


class ShardedChecker(Checker):
    """``Checker`` over every shard (``shards``: name -> URL; ``default`` the directory's)."""

    def __init__(self, shards: dict[str, str], redis_url: str, keys: Keys, spool_dir: Path) -> None:
        super().__init__(shards[DEFAULT], redis_url, keys, spool_dir)
        self.shards = shards
        self._plans: dict[str, list[Any]] = {}

    def shard_urls(self) -> dict[str, str]:
        return dict(self.shards)

    async def placed(self) -> dict[str, list[uuid.UUID]]:
        """Shard -> the workspaces the directory places there (every shard named)."""
        out: dict[str, list[uuid.UUID]] = {name: [] for name in self.shards}
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            for r in await conn.fetch("SELECT workspace_id, shard FROM workspace_shards"):
                out.setdefault(r["shard"], []).append(r["workspace_id"])
        finally:
            await conn.close()
        return out

    async def _views(
        self, name: str, conn: asyncpg.Connection, here: list[uuid.UUID], anywhere: list[uuid.UUID]
    ) -> None:
        """Each table holding workspaces' rows shadowed by a temporary view of the rows of
        ``here`` (on ``default``: also of workspaces placed nowhere, which the product
        reads there, and rows of no workspace)."""
        if name not in self._plans:
            self._plans[name] = await plan(conn)
        mine = "'{" + ",".join(str(w) for w in here) + "}'::uuid[]"
        every = "'{" + ",".join(str(w) for w in anywhere) + "}'::uuid[]"

        def own(m: re.Match[str]) -> str:
            col = m.group(1)
            if name == DEFAULT:
                return f"({col} = ANY({mine}) OR {col} IS NULL OR {col} <> ALL({every}))"
            return f"{col} = ANY({mine})"

        views = [
            f'CREATE TEMP VIEW "{t.name}" AS SELECT * FROM public."{t.name}" WHERE {_OWN.sub(own, t.where)};'
            for t in self._plans[name]
        ]
        await conn.execute("\n".join(views))

    async def on_each(self, sql: str, *args: Any) -> dict[str, list[asyncpg.Record]]:
        """``sql`` on every shard, through its views: each shard's rows."""
        where = await self.placed()
        anywhere = [w for ws in where.values() for w in ws]
        out: dict[str, list[asyncpg.Record]] = {}
        for name, url in self.shards.items():
            conn = await asyncpg.connect(url, timeout=5)
            try:
                await self._views(name, conn, where.get(name, []), anywhere)
                out[name] = await conn.fetch(sql, *args)
            finally:
                await conn.close()
        return out

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return [r for rows in (await self.on_each(sql, *args)).values() for r in rows]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of each shard's first row: summed where they are counts, any
        where they are truths, else the first that is not None."""
        got = [rows[0][0] for rows in (await self.on_each(sql, *args)).values() if rows]
        if got and all(isinstance(v, bool) for v in got):
            return any(got)
        if got and all(isinstance(v, int) for v in got):
            return sum(got)
        return next((v for v in got if v is not None), None)

    async def fetch_raw(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """``sql`` on every shard's own tables, every copy's rows (a deleted workspace's left
        behind anywhere)."""
        out: list[asyncpg.Record] = []
        for url in self.shards.values():
            conn = await asyncpg.connect(url, timeout=5)
            try:
                out += await conn.fetch(sql, *args)
            finally:
                await conn.close()
        return out

    async def ledger_history(self, workspace_id: str | None = None) -> History:
        """The ledger's history (``workers.ops.ledger_check.history``) over every shard,
        each read in one snapshot of its own, put together."""
        from workers.ops.ledger_check import history

        where = await self.placed()
        anywhere = [w for ws in where.values() for w in ws]
        rules: dict[Any, Any] = {}
        leads: list[Any] = []
        sales: list[Any] = []
        rows: list[Any] = []
        for name, url in self.shards.items():
            conn = await asyncpg.connect(url, timeout=5)
            try:
                await self._views(name, conn, where.get(name, []), anywhere)
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    r, ld, s, x = await history(conn, workspace_id)
            finally:
                await conn.close()
            rules.update(r)
            leads += ld
            sales += s
            rows += x
        return rules, leads, sales, rows

    async def placement_problems(self, workspaces: dict[str, str]) -> list[str]:
        """``workspaces``: id -> tag, of those that must be placed (not deleted)."""
        directory = await asyncpg.connect(self.database_url, timeout=5)
        try:
            shard_of = {
                str(r["workspace_id"]): r["shard"] for r in await directory.fetch("SELECT * FROM workspace_shards")
            }
            moves = {str(r["workspace_id"]): r for r in await directory.fetch("SELECT * FROM workspace_moves")}
        finally:
            await directory.close()
        copies: dict[str, dict[str, Any]] = {ws: {} for ws in workspaces}
        for name, url in self.shards.items():
            conn = await asyncpg.connect(url, timeout=5)
            try:
                for r in await conn.fetch(
                    "SELECT id, moved_to FROM public.workspaces WHERE id = ANY($1::uuid[])",
                    [uuid.UUID(w) for w in workspaces],
                ):
                    copies[str(r["id"])][name] = r["moved_to"]
            finally:
                await conn.close()
        out = []
        for ws, tag in sorted(workspaces.items(), key=lambda x: x[1]):
            on = shard_of.get(ws, DEFAULT)
            move = moves.get(ws)
            state = move["state"] if move is not None else None
            held = copies[ws]
            if state in ("copying", "fenced"):
                out.append(f"workspace {tag}: a move to {move['target']!r} left {state!r}")  # type: ignore[index]
            if on not in held:
                out.append(f"workspace {tag}: placed on {on!r}, which holds no row of it ({held})")
            elif held[on] is not None:
                out.append(f"workspace {tag}: placed on {on!r}, where its row says moved to {held[on]!r}")
            for other, moved_to in held.items():
                if other == on:
                    continue
                frozen = state == "switched" and move is not None and move["source"] == other
                if not frozen or moved_to != on:
                    why = f"a copy on {other!r} (moved_to {moved_to!r}; last move {state or 'none'})"
                    out.append(f"workspace {tag}: placed on {on!r}, and {why}")
        return out
