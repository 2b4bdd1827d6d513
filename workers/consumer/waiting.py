"""A batch written to several shards, and the waiting rooms of the workspaces a shard cannot
take now (docs/shards.md).

A batch is one transaction on each shard its workspaces are on, all at once. A shard that
is down (or a workspace fenced for a move) does not hold the batch: its events go to their
workspace's waiting room, a stream of its own (``Keys.waiting_room``), and the batch is
acked for everyone; the other shards go on committing. While a workspace's room holds
anything, its new events join the room behind them. Every worker drains the rooms of the
workspaces whose shard answers again (``drain``, a chore each second; one worker a room at
a time), writing each page in one transaction and deleting it from the room after the
commit: a crash between the two stores nothing twice (the events' dedupe), and a room
emptied is forgotten in one script with its name. An entry is parked as it was read (its
fields verbatim), so whatever an edge wrote reaches the shard as it would have.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog

from ingest.contract import wire
from ingest.contract.connections import REDIS_ERRORS, Command, Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.ledger import placement
from workers.consumer import dead_letters
from workers.consumer.dead_letters import Dead
from workers.consumer.store import BatchResult
from workers.group.errors import BatchOutage, postgres_outage, redis_outage

log = structlog.get_logger("workers.waiting")

T = TypeVar("T")
LOCK_MS = 30_000  # one worker drains a room at a time; a crashed one's turn expires
PAGE = 500  # events a drain writes in one transaction
WritePart = Callable[[str, list[Envelope]], Awaitable[BatchResult]]

# a room found empty is forgotten with its name, unless an event joined it meanwhile
_FORGET = """
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


async def _redis(step: Awaitable[T]) -> T:
    """A Redis step of a batch's write: its failure is an outage of Redis, never the batch's
    own (the batch is held and tried again, as an ack that fails is)."""
    try:
        return await step
    except REDIS_ERRORS as exc:
        raise BatchOutage(redis_outage(exc) or "redis", exc) from exc


def waits(exc: BaseException) -> bool:
    """Whether ``exc`` says the shard cannot take the events now (down, read-only, or the
    workspace fenced): they wait; anything else is the batch's own fault."""
    return isinstance(exc, placement.Moved) or postgres_outage(exc) is not None


def merge(total: BatchResult, r: BatchResult) -> None:
    total.inserted += r.inserted
    total.duplicates += r.duplicates
    total.unknown_codes += r.unknown_codes
    total.inactive_codes += r.inactive_codes
    total.milestones += r.milestones
    total.deliveries += r.deliveries
    total.refunds_not_restored += r.refunds_not_restored
    total.expired += r.expired
    total.scrubbed += r.scrubbed
    total.rowless |= r.rowless
    total.copies |= r.copies
    total.owners |= r.owners


class Rooms:
    """The waiting rooms, and how a batch is written across shards."""

    def __init__(
        self, redis: Redis, keys: Keys, shards: placement.Placement, replicated: Replicated | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        # a parked event and a room's letter, replicated before the ack or the delete after them
        self.replicated = replicated or Replicated(redis, 0, 0)
        self.fields: dict[Any, Mapping[bytes, bytes]] = {}  # an event's entry as read (its pipeline's)

    async def waiting(self) -> set[str]:
        members = await self.redis.smembers(self.keys.waiting_rooms)  # type: ignore[misc]
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def own(self, events: list[Envelope]) -> None:
        """An event the edge took while it could not resolve its link carries its code alone:
        its workspace, as the directory's claim of the code says (``Placement.workspaces_of``;
        a code no one claimed stays unowned: default drops it), and so its shard."""
        for e, ws in zip(events, await self.shards.workspaces_of(events), strict=True):
            e.workspace_id = ws

    async def sharded(self) -> bool:
        """Whether the directory, read at most ``REFRESH_S`` ago, lists several shards."""
        await self.shards.fresh()
        return self.shards.sharded

    async def write(self, events: list[Envelope], write_part: WritePart) -> BatchResult:
        """Each shard's part in its transaction, at once; the events of a workspace that
        waits, or whose shard cannot take them, to its room."""
        waiting = await _redis(self.waiting())
        await self.own(events)
        parts = await self.shards.split(events, lambda e: e.workspace_id)
        parked: list[Envelope] = []
        live: dict[str, list[Envelope]] = {}
        for name, part in parts.items():
            for e in part:  # a room's events keep their order: the new ones join behind
                if e.workspace_id in waiting or self.shards.fenced(e.workspace_id):
                    parked.append(e)
                else:
                    live.setdefault(name, []).append(e)
        total = BatchResult()
        done = await asyncio.gather(*(write_part(n, p) for n, p in live.items()), return_exceptions=True)
        for (name, part), r in zip(live.items(), done, strict=True):
            if isinstance(r, BatchResult):
                merge(total, r)
            elif isinstance(r, placement.Moved):  # a workspace fenced since the map was read
                moved = set(r.workspaces)
                parked += [e for e in part if e.workspace_id in moved]
                rest = [e for e in part if e.workspace_id not in moved]
                if rest:
                    merge(total, await write_part(name, rest))
            elif isinstance(r, Exception) and waits(r):
                log.warning("shard.waiting", shard=name, events=len(part), error=type(r).__name__)
                parked += part
                # its idle connections may be dead (a restart), or on a standby promoted
                # since, or read-only: the next write gets fresh ones
                await (await self.shards.pool_of(name)).expire_connections()
            else:
                raise r
        if parked:
            await _redis(self.park(parked))
            total.rowless |= {e.event_id for e in parked}  # no row yet: the room holds them
        return total

    async def park(self, events: list[Envelope]) -> None:
        """``events`` into their workspaces' rooms, as read; the rooms named in the set
        first (a room must never hold what no drain looks for)."""
        rooms = sorted({str(e.workspace_id) for e in events})
        commands: list[Command] = [("SADD", self.keys.waiting_rooms, *rooms)]
        for e in events:
            fields = self.fields.get(e.event_id) or wire.to_entry_dict(e)
            commands.append(("XADD", self.keys.waiting_room(str(e.workspace_id)), "*", *_flat(fields)))
        await self.replicated.send(commands)
        log.info("events.parked", rooms=len(rooms), events=len(events))

    async def drain(self, write_part: WritePart) -> BatchResult:
        """A page of each room whose shard takes it again, stored and deleted from the room."""
        total = BatchResult()
        for ws in sorted(await self.waiting()):
            if self.shards.fenced(ws):
                continue
            lock, token = f"{self.keys.waiting_room(ws)}:turn", secrets.token_hex(8)
            if not await self.redis.set(lock, token, nx=True, px=LOCK_MS):
                continue
            try:
                merge(total, await self._drain_room(ws, write_part))
            finally:
                await self.redis.delete(lock)
        return total

    async def _drain_room(self, ws: str, write_part: WritePart) -> BatchResult:
        room = self.keys.waiting_room(ws)
        page = await self.redis.xrange(room, count=PAGE)
        if not page:
            await self.redis.eval(_FORGET, 2, room, self.keys.waiting_rooms, ws)  # type: ignore[misc]
            return BatchResult()
        good, dead = [], []
        for sid, fields in page:
            try:
                good.append(wire.from_entry(fields))
            except Exception as exc:  # as the pipeline's decode: the entry's own, set aside
                dead.append((sid, f"decode: {type(exc).__name__}: {exc}", fields))
        shard = await self.shards.shard_of(ws)
        try:
            result = await write_part(shard, good) if good else BatchResult()
        except Exception as exc:
            if waits(exc):
                return BatchResult()  # still down, or fenced: the next tick tries again
            result, poison = await self._one_by_one(shard, good, write_part)
            dead += [(sid, f"store: {type(x).__name__}: {x}", f) for sid, f in page for e, x in poison if _is(e, f)]
        if dead:  # the letter keeps the entry as the room held it
            await dead_letters.write(self.replicated, self.keys, room, [Dead(sid, why, f) for sid, why, f in dead])
        await self.redis.xdel(room, *[sid for sid, _ in page])
        return result

    async def _one_by_one(
        self, shard: str, events: list[Envelope], write_part: WritePart
    ) -> tuple[BatchResult, list[tuple[Envelope, Exception]]]:
        total, poison = BatchResult(), []
        for e in events:
            try:
                merge(total, await write_part(shard, [e]))
            except Exception as exc:
                if waits(exc):
                    raise
                poison.append((e, exc))
        return total, poison


def _flat(fields: Mapping[Any, Any]) -> list[Any]:
    return [x for pair in fields.items() for x in pair]


def _is(e: Envelope, fields: Mapping[bytes, bytes]) -> bool:
    try:
        return wire.from_entry(fields).event_id == e.event_id
    except Exception:
        return False
