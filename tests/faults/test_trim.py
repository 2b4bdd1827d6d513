"""A second consumer group that reads slowly, while the workers trim every second with no
retention: the lagging group never loses an entry it has not acked. Every entry the edge
accepted is eventually read by it, and the trim did remove entries (both groups acked)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping

import pytest
import redis.asyncio as aioredis

from ingest.contract import wire
from ingest.contract.events import Dialect
from ingest.contract.keys import Keys
from ingest.contract.wire import EnvelopeError

from ..conftest import wait_for
from ._plan import Plan
from ._stage import Stage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

LAGGING = "lagging"


def marker_of(fields: Mapping[bytes, bytes]) -> str:
    """The load's marker of an entry's envelope (as MARKER_SQL finds it in Postgres)."""
    e = wire.from_entry(fields)
    if e.dialect == Dialect.BIORE:
        return str(e.payload.get("referrer"))
    if e.dialect == Dialect.REFPORT:
        return str(e.payload.get("external_id"))
    return e.event_id.hex


class SlowReader:
    """Reads ``per_read`` entries per partition every quarter second and acks them one round
    later, so some are always pending and many not yet delivered; ``hurry()`` to catch up."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, per_read: int = 2) -> None:
        self.redis, self.keys, self.per_read = redis, keys, per_read
        self.seen: Counter[str] = Counter()
        self.fieldless = 0
        self.read = 0
        self._hurry = asyncio.Event()

    def hurry(self) -> None:
        self._hurry.set()

    async def run(self) -> None:
        held: list[tuple[str, list[bytes]]] = []
        while True:
            count = 1000 if self._hurry.is_set() else self.per_read
            got: list[tuple[str, list[bytes]]] = []
            for stream in self.keys.streams:
                reply = await self.redis.xreadgroup(LAGGING, "slow", {stream: ">"}, count=count)
                entries = reply[0][1] if reply else []
                for _, fields in entries:
                    self.read += 1
                    if not fields:
                        self.fieldless += 1
                        continue
                    try:
                        self.seen[marker_of(fields)] += 1
                    except EnvelopeError:
                        self.fieldless += 1
                if entries:
                    got.append((stream, [eid for eid, _ in entries]))
            for stream, ids in held:
                await self.redis.xack(stream, LAGGING, *ids)
            held = got
            if self._hurry.is_set() and not got:
                return
            if not self._hurry.is_set():
                await asyncio.sleep(0.25)  # the reader's own slowness: the point of the scenario


async def test_lagging_group_survives_aggressive_trimming(stage: Stage, plan: Plan):
    for stream in stage.keys.streams:  # from the very first entry on
        await stage.redis.xgroup_create(stream, LAGGING, id="0", mkstream=True)
    world = await stage.prepare(workers=2, REFSTREAM_TRIM_EVERY_S="1", REFSTREAM_STREAM_RETENTION_S="0")
    reader = SlowReader(stage.redis, stage.keys)
    reading = asyncio.create_task(reader.run())
    problems = []
    try:
        async with stage.load(world) as load:
            await asyncio.sleep(plan.lagging_load_s)
        fault_end = await stage.fault_over()
        lag_at_end = len(load.record.accepted) - reader.read
        reader.hurry()
        await asyncio.wait_for(reading, 120)
    finally:
        reading.cancel()

    async def trimmed() -> bool:  # the trim cron has run past what both groups acked
        lengths: list[int] = [await stage.redis.xlen(s) for s in stage.keys.streams]
        return sum(lengths) < reader.read

    try:
        await wait_for(trimmed, timeout=30, what="the trim")
    except AssertionError:
        pass
    left = sum([await stage.redis.xlen(s) for s in stage.keys.streams])
    if left >= reader.read:
        problems.append(
            f"the trim never removed anything ({left} entries left of {reader.read} read): the scenario proved nothing"
        )
    unread = [m for m in load.record.accepted if m not in reader.seen]
    if unread:
        problems.append(
            f"the lagging group never read {len(unread)} accepted entries (trimmed before it read"
            f" them?), e.g. {unread[:3]}"
        )
    if reader.fieldless:
        problems.append(f"the lagging group read {reader.fieldless} entries without their envelope")
    print(f"\nlagging group: read {reader.read}, {lag_at_end} behind when the load stopped; {left} entries left")
    await stage.finish(
        f"lagging group, trim every 1s, retention 0 ({lag_at_end} behind)",
        load.record.accepted,
        fault_end=fault_end,
        refused=load.record.refused(),
        problems=problems,
    )
