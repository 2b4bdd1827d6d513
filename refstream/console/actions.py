"""What an operator does from the console: retry or drop dead letters and replay a range, through
the code behind ``refstream dead`` (``workers.ops.dead``) and ``refstream replay``
(``workers.ops.replay``), so the console and the command line do the same thing.

One replay (or dry run) at a time per console: a second request is told which one runs.
Two at once would not count anything twice (a replay is idempotent) but would fight over
the same rows' locks and double the load on Postgres, which is why an operator runs one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from ingest.contract import clock
from ingest.contract.connections import Redis
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.settings import Settings
from ingest.ledger.placement import Placement
from workers.archive.store import open_store
from workers.consumer.enrich import Enricher
from workers.ops import dead, replay

from .ranges import RangeUsageError, parse_time

LISTED = 200
DROPPED_BY = "dropped from the console"  # the reason a dropped letter keeps


def reason(error: str) -> str:
    """A letter's reason: its error up to the first colon (``decode``, ``store``, ...)."""
    return error.split(":", 1)[0].strip() or "unknown"


def letter_filter(given: dict[str, Any], keys: Keys) -> dead.Filter:
    """The page's filter, as ``refstream dead requeue`` takes it (``--stream`` a number)."""

    def text(name: str) -> str | None:
        v = given.get(name)
        return str(v)[:256] if isinstance(v, str) and v.strip() else None

    stream = text("stream")
    if stream is not None and stream.isdigit():
        stream = keys.stream(int(stream))
    return dead.Filter(text("error_contains"), text("code"), stream)


async def letters(redis: Redis, keys: Keys) -> dict[str, Any]:
    """The oldest ``LISTED`` letters, and how many there are by reason (all of them)."""
    by_reason: Counter[str] = Counter()
    shown: list[dict[str, Any]] = []
    async for letter in dead.scan(redis, keys):
        by_reason[reason(letter.error)] += 1
        if len(shown) < LISTED:
            shown.append({**letter.summary(), "reason": reason(letter.error), "decodable": letter.envelope is not None})
    return {"by_reason": dict(by_reason.most_common()), "letters": shown}


async def matching(redis: Redis, keys: Keys, flt: dead.Filter) -> int:
    """How many letters a retry of ``flt`` would take: what the confirmation shows."""
    return sum([1 async for letter in dead.scan(redis, keys) if flt.matches(letter)])


async def retry(
    redis: Redis, keys: Keys, *, ids: list[str] | None, flt: dead.Filter | None, replicated: Replicated | None = None
) -> dict[str, Any]:
    done = await dead.requeue(redis, keys, ids=ids, flt=flt, replicated=replicated)
    return {"matched": done.matched, "requeued": done.done, "missing": done.missing, "skipped": done.skipped}


async def drop(redis: Redis, keys: Keys, dead_id: str, replicated: Replicated | None = None) -> dict[str, Any]:
    """One letter to the dropped letters (``refstream dead drop``), never to be retried."""
    done = await dead.drop(redis, keys, DROPPED_BY, ids=[dead_id], replicated=replicated)
    return {"matched": done.matched, "dropped": done.done, "missing": done.missing}


def replay_range(given: dict[str, Any]) -> replay.Range:
    """A time range as the page sends it (ISO datetimes, or ``2h``-style durations, as
    ``refstream replay --since/--until`` read them); checked before anything runs."""
    since, until = given.get("since"), given.get("until")
    if not isinstance(since, str) or not since.strip():
        raise RangeUsageError("since: a start is needed (an ISO datetime, or 2h, 30m, 7d)")
    rng = replay.Range(
        since=parse_time(since), until=parse_time(until) if isinstance(until, str) and until.strip() else None
    )
    rng.bounds()
    return rng


@dataclass(slots=True)
class Run:
    """One replay or dry run, as the page shows it."""

    id: str
    kind: str  # "dry_run" or "replay"
    since: str
    until: str | None
    started_ms: int
    state: str = "running"  # then "done" or "failed"
    done: int = 0
    total: int | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    ended_ms: int | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Replays:
    """The console's one replay slot, and the last one that ran in it."""

    settings: Settings
    redis: Redis
    pool: asyncpg.Pool | Placement  # with several shards, each event replayed onto its workspace's
    keys: Keys
    current: Run | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def running(self) -> Run | None:
        return self.current if self.current is not None and self.current.state == "running" else None

    def start(self, kind: str, rng: replay.Range, given: dict[str, Any]) -> Run:
        """Begin a dry run or a replay; the caller checked ``running()`` first (one event
        loop: nothing starts between the check and this)."""
        run = Run(uuid.uuid4().hex[:12], kind, str(given["since"]), given.get("until"), clock.now_ms())
        self.current = run
        self._task = asyncio.create_task(self._run(run, rng))
        return run

    async def _run(self, run: Run, rng: replay.Range) -> None:
        s = self.settings
        source = replay.Source(
            self.redis, open_store(s), self.keys.prefix, replicas=s.ack_replicas, wait_ms=s.ack_wait_ms
        )
        enricher = Enricher(city_db=s.city_db)  # bot verdicts, as the workers make them

        def progress(done: int, total: int) -> None:
            run.done, run.total = done, total

        try:
            if run.kind == "dry_run":
                result: Any = await replay.plan(source, self.pool, self.keys, rng, enricher=enricher)
            else:
                result = await replay.replay(
                    source, self.pool, self.keys, rng, enricher=enricher, batch_size=s.batch_size, progress=progress
                )
            run.result, run.state = result.to_dict(), "done"
        except Exception as exc:  # shown on the page; the process goes on serving
            run.error, run.state = f"{type(exc).__name__}: {str(exc)[:300]}", "failed"
        finally:
            run.ended_ms = clock.now_ms()
            enricher.close()
            await source.aclose()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
