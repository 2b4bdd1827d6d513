"""A process's copy of the do-not-track lists (``ingest.contract.suppression``), as an edge
and an import keep it: every workspace's digests, read from Postgres at start and every
``REFSTREAM_SUPPRESSION_REFRESH_S``. An event whose workspace lists nothing costs a
dictionary look; one whose workspace lists something, a digest per identifier it carries.
While Postgres is away the last list read stays in force; before the first read, nothing
is suppressed."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from ingest.contract import suppression
from ingest.contract.connections import PG_ERRORS, cancelled_meanwhile
from ingest.contract.events import Envelope

log = structlog.get_logger("ingest.suppressed")
_READ = "SELECT workspace_id::text AS ws, digest FROM suppressions"


class Suppressed:
    def __init__(self) -> None:
        self.key: bytes | None = None
        self.lists: dict[str, frozenset[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def names(self, e: Envelope, workspace_id: str | None = None) -> bool:
        """``e`` names a listed visitor, customer or address of its workspace."""
        ws = e.workspace_id or workspace_id
        listed = self.lists.get(ws) if ws else None
        if not listed or self.key is None:
            return False
        return any(suppression.digest(self.key, ws, k, v) in listed for k, v in suppression.named(e))  # type: ignore[arg-type]

    async def read(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            if self.key is None:
                found = await conn.fetchval("SELECT salt FROM erasure_salt")
                self.key = bytes(found) if found is not None else None
            rows = await conn.fetch(_READ)
        lists: dict[str, set[bytes]] = {}
        for r in rows:
            lists.setdefault(r["ws"], set()).add(bytes(r["digest"]))
        self.lists = {ws: frozenset(d) for ws, d in lists.items()}

    def start(self, pool: asyncpg.Pool, every_s: float) -> None:
        self._task = asyncio.create_task(self._run(pool, every_s), name="suppressions")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, pool: asyncpg.Pool, every_s: float) -> None:
        while True:
            try:
                await self.read(pool)
                if self._failing:
                    log.info("suppressions.read_again", workspaces=len(self.lists))
                self._failing = False
            except (*PG_ERRORS, asyncpg.PostgresError) as exc:
                if not self._failing:
                    log.warning("suppressions.unread", error=repr(exc), kept=len(self.lists))
                self._failing = True
            cancelled_meanwhile()  # a cancel a driver's timeout lost must still end the loop (close awaits it)
            await asyncio.sleep(every_s)  # a period, not a synchronisation
