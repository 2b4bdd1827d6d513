"""The wall clock of a refstream process: every read of the time of day in ``ingest/`` and
``workers/`` goes through here (intervals and deadlines use ``time.monotonic``, not this).

Two adjustments, both one integer added to ``time.time_ns()`` (no syscall more):

- ``REFSTREAM_CLOCK_OFFSET_S``, for fault tests only: shifts this process's clock, as a
  host whose clock is wrong would be (``configure``, at the entrypoint);
- following Redis: a long-running process (the edge, the worker) compares its clock with
  Redis's ``TIME`` now and then (``start_following``). Beyond ``REFSTREAM_CLOCK_SKEW_MAX_S``
  it logs ``clock.skewed`` and reads Redis's time from then on (its own plus the difference
  measured), so the event ids an edge mints, and so the day their rows fall in, are
  Redis's days, whatever the host's clock says. Within the bound, nothing is corrected.
  While Redis cannot answer (an edge started during an outage, spooling), Postgres's
  ``clock_timestamp()`` is measured instead, and until one of them answers the measurement
  is tried again a second after each attempt, not ``FOLLOW_EVERY_S`` later: an edge must
  not spool ids minted on a skewed clock for half a minute because Redis was away when it
  started.

What is destructive or ordering-sensitive trusts no process's clock at all (docs/guarantees.md,
one clock decides): partition drops and event retention follow Postgres's, the stream trim
Redis's ``TIME``, link cache versions a Postgres sequence. ``skew`` is how those steps tell
that this process's own clock (``local``) disagrees with theirs, and then refuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog

from ingest.contract.errors import Misconfigured

log = structlog.get_logger("ingest.clock")

FOLLOW_EVERY_S = 30.0
FIRST_WAIT_S = 1.0  # per reference, at start and at each retry
RETRY_EVERY_S = 1.0  # while no reference has answered
SKEW_MAX_S = 300.0  # REFSTREAM_CLOCK_SKEW_MAX_S's default

_offset_ns = 0  # REFSTREAM_CLOCK_OFFSET_S
_follow_ns = 0  # the reference's clock minus this process's, while beyond the bound
_shift_ns = 0  # the two together: one addition per read


def configure(offset_s: float) -> None:
    """Apply ``REFSTREAM_CLOCK_OFFSET_S`` (``settings.clock_offset_s``); at the entrypoint."""
    global _offset_ns, _shift_ns
    _offset_ns = int(offset_s * 1e9)
    _shift_ns = _offset_ns + _follow_ns


def now() -> float:
    """Seconds since the epoch, as this process should see them."""
    return (time.time_ns() + _shift_ns) / 1e9


def now_ms() -> int:
    return (time.time_ns() + _shift_ns) // 1_000_000


def utcnow() -> datetime:
    return datetime.fromtimestamp(now(), UTC)


def local() -> float:
    """This process's own clock (the test offset applied, not following Redis): what a
    destructive step compares with Postgres's or Redis's before it trusts anything here."""
    return (time.time_ns() + _offset_ns) / 1e9


def following_s() -> float:
    """How far ``now`` is moved to follow Redis (0: not following)."""
    return _follow_ns / 1e9


class Skewed(Misconfigured):
    """This process's clock differs from the reference clock by more than the bound."""

    def __init__(self, reference: str, skew_s: float, bound_s: float) -> None:
        super().__init__(f"this process's clock is {skew_s:+.1f}s off {reference}'s (bound {bound_s:g}s)")
        self.reference, self.skew_s, self.bound_s = reference, skew_s, bound_s


def skew(reference_s: float, before_s: float, after_s: float) -> float:
    """This process's clock minus the reference's, read between ``before_s`` and ``after_s``
    (``local()`` on each side of the round trip: the reference is taken at their middle)."""
    return (before_s + after_s) / 2 - reference_s


async def redis_skew(redis: Any) -> tuple[float, float]:
    """(Redis's ``TIME`` in seconds, ``local()`` minus it)."""
    before = local()
    secs, micros = await redis.time()
    reference = int(secs) + int(micros) / 1e6
    return reference, skew(reference, before, local())


async def postgres_skew(conn: Any) -> tuple[float, float]:
    """(Postgres's ``clock_timestamp()`` in seconds, ``local()`` minus it)."""
    before = local()
    reference = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
    return reference, skew(reference, before, local())


def check(reference: str, skew_s: float, bound_s: float) -> None:
    """Raise ``Skewed`` when ``skew_s`` is past ``bound_s``."""
    if abs(skew_s) > bound_s:
        raise Skewed(reference, skew_s, bound_s)


def _set_following(skew_s: float, bound_s: float, reference: str = "redis") -> None:
    global _follow_ns, _shift_ns
    was = _follow_ns
    _follow_ns = -int(skew_s * 1e9) if abs(skew_s) > bound_s else 0
    _shift_ns = _offset_ns + _follow_ns
    if _follow_ns and not was:
        log.warning("clock.skewed", skew_s=round(skew_s, 3), bound_s=bound_s, following=reference)
    elif was and not _follow_ns:
        log.info("clock.agrees", skew_s=round(skew_s, 3), bound_s=bound_s, reference=reference)


async def follow_once(redis: Any, bound_s: float, postgres: Any = None) -> float:
    """Measure this process's clock against Redis's (Postgres's when Redis does not answer
    within ``FIRST_WAIT_S`` and a pool is given) and follow it while they differ by more than
    ``bound_s``; the skew measured comes back. Raises when neither answers."""
    try:
        _, measured = await asyncio.wait_for(redis_skew(redis), FIRST_WAIT_S)
        reference = "redis"
    except Exception:
        if postgres is None:
            raise
        measured = await _uncancelled(_pool_skew(postgres), FIRST_WAIT_S)
        reference = "postgres"
    _set_following(measured, bound_s, reference)
    return measured


async def _uncancelled(measuring: Coroutine[Any, Any, float], within_s: float) -> float:
    """``measuring``'s result within ``within_s``, else ``TimeoutError``, and the measurement
    left to end on its own: cancelling a query asyncpg has sent waits, with no bound, for
    the server to take the cancel, which a slow or cut-off Postgres may never do."""
    task = asyncio.ensure_future(measuring)
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its outcome read, not raised
        raise TimeoutError(f"Postgres did not answer within {within_s:g}s")
    return task.result()


async def _pool_skew(pool: Any) -> float:
    async with pool.acquire() as conn:
        _, measured = await postgres_skew(conn)
    return measured


async def start_following(
    redis: Any, bound_s: float, *, postgres: Any = None, every_s: float = FOLLOW_EVERY_S
) -> asyncio.Task[None]:
    """Measure once now (a second or two at most: a process starts while Redis and Postgres
    are away, and then reads its own clock until a measurement succeeds, retried every
    ``RETRY_EVERY_S``), then every ``every_s`` in a task, until it is cancelled. Once one
    measurement has succeeded, an outage of both keeps its answer."""
    measured = True
    try:
        await follow_once(redis, bound_s, postgres)
    except Exception as exc:
        measured = False
        log.info("clock.unmeasured", error=exc)
    return asyncio.create_task(_follow(redis, bound_s, every_s, postgres, measured), name="clock-follow")


async def _follow(redis: Any, bound_s: float, every_s: float, postgres: Any, measured: bool) -> None:
    while True:
        await asyncio.sleep(every_s if measured else RETRY_EVERY_S)
        try:
            await follow_once(redis, bound_s, postgres)
            measured = True
        except Exception as exc:  # an outage: the spool and the gate deal with it, not the clock
            log.debug("clock.unmeasured", error=exc)  # a measurement made before still holds
