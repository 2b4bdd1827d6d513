"""Poison planted amid good traffic: entries that cannot be decoded, entries without the
envelope field, entries whose data Postgres refuses. Exactly those are dead-lettered (each
once, with its stream and id); every other entry, planted or sent, is stored once."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType
from ingest.contract.wire import FIELD

from .._world import BROWSER
from ._load import referer_marker
from ._plan import Plan
from ._stage import Stage, World

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def _click(world: World, code: str, referrer: str) -> Envelope:
    return Envelope(
        type=EventType.CLICK,
        dialect=Dialect.BIORE,
        workspace_id=world.workspace_id,
        ip="203.0.113.9",
        user_agent=BROWSER,
        payload={"code": code, "referrer": referrer},
    )


def _poison(world: World, code: str, i: int) -> tuple[str, dict[bytes, bytes]]:
    """The i-th poison entry (its kind, its fields), for a stream that ``code`` routes to."""
    kinds: list[tuple[str, dict[bytes, bytes]]] = [
        ("not JSON", {FIELD: b"\x00 not an envelope"}),
        ("not UTF-8", {FIELD: b"\xff\xfe\xfd"}),
        ("a JSON list that is no envelope", {FIELD: b'[1, "nope"]'}),
        ("no envelope field", {b"x": b"1"}),
        ("no envelope field, other fields", {b"event": b"click", b"code": code.encode()}),
        # decodes, and Postgres refuses it: a NUL in a text column (SQLSTATE class 22)
        ("NUL in the referrer", {FIELD: wire.to_blob(_click(world, code, referer_marker() + "\x00"))}),
    ]
    return kinds[i % len(kinds)]


async def test_poison_amid_good_traffic(stage: Stage, plan: Plan):
    world = await stage.prepare(workers=2)
    planted: set[tuple[str, str]] = set()
    kinds: dict[str, int] = {}
    good: dict[str, str] = {}
    async with stage.load(world) as load:
        await stage.storing()
        end = time.monotonic() + plan.poison_load_s
        i = 0
        while time.monotonic() < end:
            code = world.codes[i % len(world.codes)]
            stream = stage.keys.stream_for(code)
            kind, fields = _poison(world, code, i)
            entry = await stage.redis.xadd(stream, fields)
            planted.add((stream, entry.decode()))
            kinds[kind] = kinds.get(kind, 0) + 1
            marker = referer_marker()  # and a good entry planted the same way, right after it
            await stage.redis.xadd(stream, {FIELD: wire.to_blob(_click(world, code, marker))})
            good[marker] = "planted"
            i += 1
            await asyncio.sleep(0.1)  # the planting rhythm: poison spread over many batches
        fault_end = await stage.fault_over()
    print(f"\nplanted poison: {kinds}")
    await stage.finish(
        f"poison x{len(planted)}",
        {**load.record.accepted, **good},
        fault_end=fault_end,
        refused=load.record.refused(),
        planted_dead=planted,
    )
