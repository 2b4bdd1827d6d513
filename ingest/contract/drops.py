"""Why an event did not count: the reasons, and the edge's tally of its own refusals.

The edge refuses some events before they become one (a rate limit, an unknown or inactive
code, a request it cannot read, a client's repeat): no event row will ever say so, and a
Postgres write per refused request is what a flood of them must not cost. ``DropTally``
counts them in the process and, about once a second, adds the tally to one Redis hash
(``HINCRBY``, through the micro-batcher: the commands share the round trip of whatever
requests are in flight). The workers fold that hash into ``drop_stats`` exactly once
(``workers.consumer.drops``). Precision: a refusal reaches the stats within a second plus the
workers' fold period; a tally the edge could not send is kept and sent with the next one
(so a reply lost after Redis applied it would count twice); what is in Redis and not yet
folded is lost with Redis's data, and an edge killed (not stopped) loses its last second.

Field layout of the hash: ``day|workspace|link|reason|detail``; ``NO_ID`` stands for "no
link" (or "no workspace") resolved.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Any, Final, Protocol

import structlog

from ingest.contract import background, clock
from ingest.contract.connections import REDIS_ERRORS, Command, cancelled_meanwhile
from ingest.contract.errors import NotSent, OutcomeUnknown

log = structlog.get_logger("ingest.drops")

# the reasons an event is not counted (``fraud``: excluded by the workspace's fraud policy;
# ``no_lead``: a sale stored and counted as revenue, but credited to no affiliate)
REASONS: Final = (
    "bot",
    "unknown_code",
    "inactive_link",
    "rate_limited",
    "out_of_window",
    "test_mode",
    "duplicate",
    "invalid",
    "fraud",
    "no_lead",
    "suppressed",
)
FLAGGED: Final = "flagged"  # not a drop: every fraud flag, counted by rule beside the drops
NO_ID: Final = "00000000-0000-0000-0000-000000000000"
MAX_FIELDS: Final = 100_000  # a tally Redis cannot take for long stops growing here
# the newest codes the edge refused as unknown, for the console's tail: a capped stream
# (REFUSED_KEPT), added to with the tally's flush, the newest REFUSED_PER_FLUSH of each
# second from each edge process however many were refused (no write per request); sent
# once, not kept when Redis cannot take them
REFUSED_PER_FLUSH: Final = 20
REFUSED_KEPT: Final = 500
MAX_CODE: Final = 128


def live_key(prefix: str) -> str:
    """The hash the edges add to; every drops key shares one hash tag, so the workers' fold
    (a rename and a set, in one script) runs unchanged on a Redis Cluster."""
    return f"{prefix}:drops:{{drops}}:live"


def refused_key(prefix: str) -> str:
    """The stream of the newest codes the edges refused as unknown (``DropTally.refused``)."""
    return f"{prefix}:drops:refused"


def folds_key(prefix: str) -> str:
    return f"{prefix}:drops:{{drops}}:folds"


def fold_key(prefix: str, token: str) -> str:
    return f"{prefix}:drops:{{drops}}:fold:{token}"


def field(day: str, workspace_id: str | None, link_id: str | None, reason: str, detail: str = "") -> str:
    return "|".join((day, workspace_id or NO_ID, link_id or NO_ID, reason, detail.replace("|", "/")))


def parse_field(raw: bytes | str) -> tuple[str, str, str, str, str] | None:
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split("|", 4)
    if len(parts) != 5 or parts[3] not in (*REASONS, FLAGGED):
        return None
    day, ws, link, reason, detail = parts
    return day, ws, link, reason, detail


class Executes(Protocol):
    """What the tally sends through: the edge's micro-batcher (``ingest.edge.batcher``)."""

    async def execute(self, *commands: Command) -> list[Any]: ...


class DropTally:
    """The edge's refusals, counted in memory and added to Redis about once a second."""

    def __init__(self, batcher: Executes, prefix: str, *, every_s: float = 1.0) -> None:
        self._batcher = batcher
        self._key = live_key(prefix)
        self._every_s = every_s
        self._counts: Counter[str] = Counter()
        self._refused_key = refused_key(prefix)
        self._refused: deque[tuple[int, str, str]] = deque(maxlen=REFUSED_PER_FLUSH)
        self._task: asyncio.Task[None] | None = None

    def note(self, workspace_id: str | None, link_id: str | None, reason: str, detail: str = "") -> None:
        """One event refused for ``reason``; ``workspace_id``/``link_id`` where they resolved.
        The hook for every refusal at the edge (a client's repeat within the idempotency
        window included: ``reason="duplicate"``)."""
        if reason not in REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        if len(self._counts) >= MAX_FIELDS:
            return
        day = clock.utcnow().date().isoformat()
        self._counts[field(day, workspace_id, link_id, reason, detail)] += 1

    def refused(self, code: str, route: str) -> None:
        """A code the edge refused as unknown (noted as ``unknown_code`` too), kept for the
        console's tail with the route that refused it: the newest ``REFUSED_PER_FLUSH``
        until the next flush."""
        self._refused.append((clock.now_ms(), route, code[:MAX_CODE]))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drop-tally")

    async def close(self) -> None:
        """Stop the timer and send what is left (before the batcher closes)."""
        await background.stopped(self._task, "drop tally")
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        if self._refused:
            await self._send_refused()
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        items = sorted(counts.items())
        try:
            replies = await self._batcher.execute(*(("HINCRBY", self._key, f, n) for f, n in items))
        except (NotSent, OutcomeUnknown, *REDIS_ERRORS) as exc:
            log.warning("drops.flush_failed", error=exc, fields=len(items))
            self._counts.update(counts)
            return
        errors = [r for r in replies if isinstance(r, Exception)]
        failed = [(f, n) for (f, n), r in zip(items, replies, strict=True) if isinstance(r, Exception)]
        if failed:
            log.warning("drops.flush_failed", error=errors[0], fields=len(failed))
            self._counts.update(dict(failed))

    async def _send_refused(self) -> None:
        recent = list(self._refused)
        self._refused.clear()
        xadd = ("XADD", self._refused_key, "MAXLEN", "~", REFUSED_KEPT, "*")
        try:
            await self._batcher.execute(*((*xadd, "at", at, "route", r, "code", c) for at, r, c in recent))
        except (NotSent, OutcomeUnknown, *REDIS_ERRORS) as exc:  # the tail's view only: the counts go on as ever
            log.warning("drops.refused_not_sent", error=exc, codes=len(recent))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.flush()
            except Exception:  # the timer must outlive any failure
                cancelled_meanwhile()
                log.exception("drops.flush_crashed")
            cancelled_meanwhile()  # a flush that returned although its task was cancelled (close awaits it)
