"""The erasures a restore of Postgres (or a failover) lost, put back from their copy in Redis
(``ingest.privacy.erasure_copy``) once per worker process, before it stores anything, so the
person's events in the streams are stored scrubbed (``workers.consumer.erased.restore_ledger``).

Whichever partition's batch comes first restores (the others wait on its lock). An outage:
the batch waits. On several shards, each shard's ledger on its own: a shard whose restore
failed (its Postgres away) is tried again before anything is written there (``shard``), and
until then its events wait in its workspaces' rooms, while the other shards' are stored. (A
worker started during one shard's outage stored nothing for any shard until it ended.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from ingest.contract.connections import Redis
from ingest.contract.keys import Keys
from ingest.ledger import placement
from workers.consumer import erased
from workers.group.errors import postgres_outage

log = structlog.get_logger("workers.pipeline")


class LedgerRestore:
    """``sharded``: whether the workers write to several shards now; ``held``: raises the
    batch's outage for an error that is one (Postgres's, Redis's), else returns."""

    def __init__(
        self,
        place: placement.Placement,
        redis: Redis,
        keys: Keys,
        sharded: Callable[[], Awaitable[bool]],
        held: Callable[[Exception], Awaitable[None]],
    ) -> None:
        self.place, self.redis, self.keys = place, redis, keys
        self.sharded, self.held = sharded, held
        self.done = False
        self.unrestored: set[str] | None = None  # the shards whose restore failed (None: not tried)
        self._lock = asyncio.Lock()

    async def all(self) -> None:
        """Before a batch: every shard's (those that failed last time), once."""
        async with self._lock:
            if self.done:
                return
            try:
                failed = await erased.restore_ledger(self.place, self.redis, self.keys, self.unrestored)
                # a shard's Postgres away waits in its rooms; anything else (Redis) holds the batch
                others = [e for e in failed.values() if postgres_outage(e) is None]
                if others or (failed and not await self.sharded()):
                    raise (others or list(failed.values()))[0]
            except Exception as exc:
                await self.held(exc)
                raise
            self.unrestored = set(failed)
            if failed:
                log.warning("ledger.unrestored", shards=sorted(failed))
            self.done = not failed

    async def shard(self, name: str) -> None:
        """Before a write on shard ``name``: its restore, where it failed before. Raises the
        restore's error while it cannot be made (its Postgres away: the write's events wait
        in their rooms; Redis away: the batch waits)."""
        async with self._lock:
            if not self.unrestored or name not in self.unrestored:
                return
            failed = await erased.restore_ledger(self.place, self.redis, self.keys, {name})
            if name in failed:
                if postgres_outage(exc := failed[name]) is None:
                    await self.held(exc)
                raise exc
            self.unrestored.discard(name)
            self.done = not self.unrestored
