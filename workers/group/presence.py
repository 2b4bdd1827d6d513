"""Each worker's state in Redis, for ``refstream status``: ``{prefix}:workers``, a hash of
consumer name → JSON (state, outage reasons, since when, last refresh, totals).

Workers publish every ``EVERY_S`` and on each change of state; a state not refreshed for
``STALE_AFTER_S`` is shown as stale (the worker is probably gone), and one not refreshed
for ``FORGET_AFTER_S`` is removed by whichever worker publishes next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ingest.contract.connections import Redis
from ingest.contract.keys import Keys

EVERY_S = 5.0
STALE_AFTER_S = 20.0
FORGET_AFTER_S = 3600.0


@dataclass(slots=True)
class WorkerState:
    """What a worker last published: running, or blocked by an outage and why."""

    consumer: str
    state: str  # "running" or "blocked"
    reasons: list[str]
    blocked_for_s: float | None
    seen_s_ago: float
    stale: bool  # not refreshed for a while: the worker is probably gone


def _entries(raw: dict[Any, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, value in raw.items():
        try:
            d = orjson.loads(value)
            float(d["at"])
        except (ValueError, KeyError, TypeError):
            d = {"at": 0.0}  # unreadable: stale at once
        out.append((name.decode() if isinstance(name, bytes) else str(name), d))
    return out


async def publish(redis: Redis, keys: Keys, name: str, state: dict[str, Any]) -> None:
    """Write ``state`` (``at`` is set here) and forget the workers gone for long. ``at`` is
    Redis's time, as ``read`` ages it: a worker whose clock runs ahead would otherwise
    forget every other worker's state (docs/guarantees.md: one clock decides)."""
    secs, micros = await redis.time()
    now = int(secs) + int(micros) / 1e6
    await redis.execute_command("HSET", keys.workers, name, orjson.dumps({**state, "at": now}))
    raw = await redis.execute_command("HGETALL", keys.workers)
    gone = [n for n, d in _entries(raw) if now - float(d["at"]) > FORGET_AFTER_S]
    if gone:
        await redis.execute_command("HDEL", keys.workers, *gone)


async def forget(redis: Redis, keys: Keys, name: str) -> None:
    await redis.execute_command("HDEL", keys.workers, name)


async def read(redis: Redis, keys: Keys, now: float) -> list[WorkerState]:
    """Every published state, by consumer name, ages against ``now`` (Redis's clock)."""
    out = []
    for name, d in sorted(_entries(await redis.execute_command("HGETALL", keys.workers))):
        at, since = float(d["at"]), d.get("since")
        if not at:
            continue
        out.append(
            WorkerState(
                name,
                str(d.get("state", "?")),
                [str(r) for r in d.get("reasons", [])],
                None if since is None else max(0.0, now - float(since)),
                max(0.0, now - at),
                now - at > STALE_AFTER_S,
            )
        )
    return out
