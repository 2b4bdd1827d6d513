"""The member loop: the group on every partition, one reader per partition, settling what
its user's part holds through outages, housekeeping and state (see ``workers/group``).

The partitions are the layout's (``ingest.contract.layout``), read live: a partition added by
``refstream partitions set`` gets its reader within a second, and a retiring one keeps its
reader until it is retired (deleted when empty), when the reader ends."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import structlog
from redis.exceptions import ResponseError

from ingest.contract import layout
from ingest.contract.connections import Redis, cancelled_meanwhile
from ingest.contract.keys import Keys, parse_id
from ingest.contract.settings import Settings
from workers.group import housekeeping, joining, stopping
from workers.group.claims import Claims, text
from workers.group.errors import BatchOutage, redis_outage
from workers.group.gate import Backoff, Gate
from workers.group.joining import LEAVE_WITHIN_S
from workers.group.part import Chore, Entry, Part
from workers.group.reads import Reads

log = structlog.get_logger("workers.group")


class Member:
    """One member of ``group`` on every partition, named ``name``; ``part`` makes the user's
    part for a partition. ``role`` names its log lines (``consumer.start``, ...) and
    ``presence_name`` its row in ``refstream status``."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        group: str,
        name: str,
        part: Callable[[int, str], Part],
        role: str,
        presence_name: str | None = None,
        reclaim_count: int | None = None,
        linger: tuple[int, float] | None = None,
        lingers: Callable[[], bool] = lambda: True,
        interval_s: float = 0.0,
        chores: Iterable[Chore] = (),
        totals: Callable[[], dict[str, Any]] = dict,
        on_gate: Callable[[Gate], None] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.stream_prefix, settings.partitions)
        self.redis = redis
        self.group, self.name, self.role = group, name, role
        self.presence_name = presence_name or name
        self.reclaim_count = reclaim_count or settings.batch_size
        # a fresh read returning fewer than linger[0] entries waits linger[1] s once and
        # takes what arrived meanwhile (no BLOCK) into the same read, where ``lingers()``
        # says so at that moment: see workers/consumer/consume.py
        self.linger = linger
        self.lingers = lingers
        # a fresh read that follows one that found some entries waits for the next multiple
        # of interval_s (``REFSTREAM_READ_INTERVAL_MS``); one that found none, or a full
        # batch, is followed at once
        self.interval_s = interval_s
        self._paced: dict[int, bool] = {}  # a partition -> its last fresh read found some, not a full batch
        self.chores = list(chores)
        self.totals = totals
        self._on_gate = on_gate
        self.gate = Gate(on_change=self._gate_changed)
        self.claims = Claims(redis, group, name, settings.claim_idle_ms)
        self._part = part
        self.parts: dict[int, Part] = {}
        self._backlog: defaultdict[int, bool] = defaultdict(lambda: True)
        self._cursor: defaultdict[int, str] = defaultdict(lambda: "0")  # the last own pending entry read again
        self._joined: defaultdict[int, bool] = defaultdict(bool)
        self.watch = layout.Watch(redis, self.keys, settings.partitions, changed=self._layout_changed)
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._drain = False
        self._stopping = False
        self._stopped = asyncio.Event()  # set by stop(): the readers' wait starts counting the bound
        self._stop_by: float | None = None  # the loop's time by which the readers must have ended
        self._handed_back = 0  # entries handed back at the stop (an outage, or the bound passed)
        self._reads = Reads(redis, group, name, settings.ack_replicas, settings.ack_wait_ms)
        self._publish_now = asyncio.Event()

    # -- the group ----------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        """The group on every partition the layout has (raises what Redis refuses, see
        ``_ensure``; a partition retired meanwhile is skipped)."""
        for p in range((await self.watch.read()).span):
            try:
                await joining.ensure(self.redis, self.keys, self.group, self.keys.stream(p))
            except layout.Retired:
                continue

    async def _join(self, p: int, stream: str) -> bool:
        """The group on partition ``p`` (``joining.join``); False when stopped first."""
        if not await joining.join(self.redis, self.keys, self.group, self.gate, p, stream, lambda: self._stopping):
            return False
        self._joined[p] = True
        return True

    # -- running ------------------------------------------------------------------------

    async def run(self, *, drain: bool = False) -> None:
        """Read every partition until ``stop()``; with ``drain``, until the group has read
        and acked everything in every partition."""
        try:
            span = (await self.watch.read()).span
        except Exception as exc:  # Redis away: REFSTREAM_PARTITIONS until it answers
            log.warning(f"{self.role}.layout_unread", error=exc)
            span = self.watch.layout.span
        log.info(f"{self.role}.start", consumer=self.name, group=self.group, partitions=span, drain=drain)
        self._drain = drain
        background = [asyncio.create_task(self._keep_claims())]
        if not drain:
            background.append(asyncio.create_task(self._housekeeping()))
        for p in range(span):
            self._spawn(p)
        self.watch.start()
        cut_short = False
        try:
            cut_short = await self._readers_done()
        except BaseException:
            # a reader died of a bug: the others finish what they hold (or hand it back),
            # within the stop's bound, before the process exits for a restart, rather than
            # have their pools closed
            self.stop()
            await self._readers_done()
            raise
        finally:
            # a cancel alone may not end these (see workers/group/stopping.py): bounded
            await self.watch.close()
            await stopping.end(background, f"{self.role} housekeeping")
            await self._reads.aclose()
        await self._leave()
        log.info(
            f"{self.role}.stop", consumer=self.name, handed_back=self._handed_back, cut_short=cut_short, **self.totals()
        )

    async def _readers_done(self) -> bool:
        """Until every reader has ended (a reader's death raised); once stopped, at most
        ``drain_timeout_s``: then the readers still settling are cancelled and what their
        parts hold is handed back. True when the bound cut the stop short."""
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            while pending := [t for t in self._readers.values() if not t.done()]:
                left = None if self._stop_by is None else self._stop_by - loop.time()
                if left is not None and left <= 0:
                    await self._cut_short(pending)
                    return True
                waiting = pending if stopped.done() else [*pending, stopped]
                done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopped and not task.cancelled() and (died := task.exception()) is not None:
                        raise died
            return False
        finally:
            stopped.cancel()

    async def _cut_short(self, readers: list[asyncio.Task[None]]) -> None:
        """The stop's bound passed with ``readers`` still settling (a batch stuck behind a
        lock, a call that never answers): cancel them, and hand back what their parts held.
        Entries whose batch committed before the cut are stored again as duplicates by
        whoever takes them: nothing counts twice, nothing is lost."""
        held = {p: part.held() for p, part in self.parts.items()}  # a cancelled reader forgets its part
        await stopping.end(readers, f"{self.role} readers")
        try:
            # each a Redis call within the socket timeout; all of them bounded too: entries
            # not marked idle are still pending here, reclaimed after claim_idle_ms instead
            async with asyncio.timeout(LEAVE_WITHIN_S):
                for p, ids in held.items():
                    if ids:
                        await self._hand_back(p, self.keys.stream(p), ids)
        except TimeoutError:
            log.warning(f"{self.role}.hand_back_timeout", within_s=LEAVE_WITHIN_S)
        log.warning(
            f"{self.role}.drain_cut_short",
            consumer=self.name,
            drain_timeout_s=self.settings.drain_timeout_s,
            handed_back=sum(len(ids) for ids in held.values()),
        )

    def _spawn(self, p: int) -> None:
        """A reader for partition ``p``, unless one runs (or the member stops)."""
        task = self._readers.get(p)
        if self._stopping or (task is not None and not task.done()):
            return
        self._readers[p] = asyncio.create_task(self._partition(p, self._drain), name=f"{self.role}-{p}")

    async def _layout_changed(self, now: layout.Layout) -> None:
        """A partition the layout added gets its reader; a retiring one keeps its own."""
        if self._readers:  # started
            for p in range(now.span):
                self._spawn(p)

    def stop(self) -> None:
        """Stop reading; each partition settles what it holds (or hands it back when an
        outage holds it) and returns within one block time; ``run`` returns within
        ``drain_timeout_s`` (and a few seconds to close) whatever happens."""
        self._stopping = True
        if self._stop_by is None:
            self._stop_by = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        self._stopped.set()

    async def _partition(self, p: int, drain: bool) -> None:
        stream = self.keys.stream(p)
        if not await self._join(p, stream):
            return  # stopped first, or the partition was retired
        try:
            await self._read_partition(p, stream, drain)
        except layout.Retired:
            log.info(f"{self.role}.partition_retired", stream=stream, consumer=self.name)
        finally:
            self.parts.pop(p, None)

    async def _read_partition(self, p: int, stream: str, drain: bool) -> None:
        part = self.parts[p] = self._part(p, stream)
        backoff, failure = Backoff(), None
        while True:
            cancelled_meanwhile()  # cut short by the stop's bound, the cancel lost in a client call
            room = part.room()
            if part.held() and (room == 0 or self._stopping):
                if not await self._settle(p, stream, part):
                    return  # stopping during an outage: handed back
                backoff.reset()
                continue
            if self._stopping:
                return
            if self.gate.closed:  # Postgres is out: reading more would only pile up entries
                await self.gate.wait_open(self.settings.block_ms / 1000)
                continue
            try:
                try:
                    entries, again = await self._read(p, stream, part, room)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                        raise
                    # the stream was deleted under us: from id 0 again, or retired: the end
                    await joining.ensure(self.redis, self.keys, self.group, stream)
                    self._backlog[p], self._cursor[p] = True, "0"
                    continue
            except layout.Retired:
                raise
            except Exception as exc:
                cancelled_meanwhile()
                reason = redis_outage(exc) or "error"
                if reason != failure:
                    log.warning(f"{self.role}.read_failed", stream=stream, reason=reason, error=exc)
                    failure = reason
                self._backlog[p], self._cursor[p] = True, "0"  # a read may have been delivered, its reply lost
                await backoff.sleep()
                continue
            if failure is not None:
                log.info(f"{self.role}.read_resumed", stream=stream)
                failure = None
            backoff.reset()
            part.take(entries, again)
            if drain and not entries and not self._backlog[p]:
                if not part.held():
                    if await self._drained(stream):
                        return
                else:
                    part.quiet()

    async def _settle(self, p: int, stream: str, part: Part) -> bool:
        """``part.settle()`` until it succeeds; False when stopping during an outage, the
        entries handed back instead."""
        backoff, failure = Backoff(), None
        while True:
            try:
                await part.settle()
            except BatchOutage as exc:
                if exc.reason != failure:
                    log.warning(f"{self.role}.held", stream=stream, reason=exc.reason, error=exc)
                    failure = exc.reason
                self.gate.block(p, exc.reason)
                if self._stopping:
                    await self._hand_back(p, stream, part.held())
                    self.gate.clear(p)
                    return False
                await backoff.sleep()
                continue
            if failure is not None:
                log.info(f"{self.role}.resumed", stream=stream)
            self.gate.clear(p)
            return True

    # -- reading ------------------------------------------------------------------------

    async def _read(self, p: int, stream: str, part: Part, count: int) -> tuple[list[Entry], bool]:
        """(entries, read again): this member's own pending entries first, then new ones."""
        if self._backlog[p]:
            count = await part.backlog_count(self._cursor[p], count)
            reply = await self._reads.xreadgroup({stream: self._cursor[p]}, count)
            entries: list[Entry] = reply[0][1] if reply else []
            if not entries:
                self._backlog[p], self._cursor[p] = False, "0"
                return [], True
            self._cursor[p] = text(entries[-1][0])
            return entries, True
        block = part.block_ms()
        block = self.settings.block_ms if block is None else max(10, min(block, self.settings.block_ms))
        if self.interval_s and self._paced.get(p) and not self._stopping:
            # on the member's tick, the same for all its partitions: their reads come back
            # together and go in one transaction (the combiner's gather)
            await asyncio.sleep(self.interval_s - asyncio.get_running_loop().time() % self.interval_s)
        reply = await self._reads.xreadgroup({stream: ">"}, count, block)
        entries = reply[0][1] if reply else []
        self._paced[p] = 0 < len(entries) < count  # a full read (a drain, a backlog) is followed at once
        if (
            self.linger
            and entries
            and len(entries) < min(self.linger[0], count)
            and not self._stopping
            and self.lingers()
        ):
            await asyncio.sleep(self.linger[1])
            more = await self._reads.xreadgroup({stream: ">"}, count - len(entries))
            entries += more[0][1] if more else []
        return entries, False

    async def _drained(self, stream: str) -> bool:
        """Everything appended has been delivered and acked, by anyone. Entries pending in
        another member are claimed once idle long enough (that member may be dead)."""
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if text(g["name"]) == self.group), None)
        if group is None:
            return False
        if group["pending"]:
            await self.reclaim()
            return False
        info = await self.redis.xinfo_stream(stream)
        return parse_id(group["last-delivered-id"]) >= parse_id(info["last-generated-id"])

    # -- claims -------------------------------------------------------------------------

    async def reclaim(self) -> int:
        """Claim entries idle longer than ``claim_idle_ms`` in other (dead) members; the
        backlog read then takes them."""
        claimed = 0
        for p in [p for p, joined in self._joined.items() if joined and p in self.parts]:
            stream = self.keys.stream(p)
            if n := await self.claims.reclaim(stream, self.reclaim_count):
                self._backlog[p], self._cursor[p] = True, "0"
                claimed += n
        if claimed:
            log.info(f"{self.role}.reclaimed", consumer=self.name, entries=claimed)
        return claimed

    async def _keep_claims(self) -> None:
        """Every ``claim_idle_ms / 3``: what each part holds stays this member's."""
        while True:
            await asyncio.sleep(self.settings.claim_idle_ms / 3000)
            for p, part in list(self.parts.items()):
                cancelled_meanwhile()  # the stop's cancel, lost in a Redis call (workers/group/stopping.py)
                if ids := part.held():
                    stream = self.keys.stream(p)
                    if lost := await self.claims.keep(stream, ids):
                        log.warning(f"{self.role}.claims_lost", stream=stream, consumer=self.name, entries=len(lost))
                        part.drop(lost)

    async def _hand_back(self, p: int, stream: str, ids: list[str]) -> None:
        self._backlog[p], self._cursor[p] = True, "0"
        await self.claims.hand_back(stream, ids)
        self._handed_back += len(ids)
        log.info(f"{self.role}.handed_back", stream=stream, entries=len(ids))

    # -- housekeeping -------------------------------------------------------------------

    def _housekeeping(self) -> Coroutine[Any, Any, None]:
        """Reclaim, the user's chores and the state on their own timers, each failure logged
        and survived; the state also at once on a change. Reclaiming waits while Postgres is
        out (nothing could be processed) and once stopping (it would take back what was just
        handed back)."""
        chores = [Chore("reclaim", self.settings.reclaim_every_s, self.reclaim, needs_postgres=True), *self.chores]
        return housekeeping.run(
            self.redis,
            self.keys,
            self.presence_name,
            chores,
            self.gate,
            self._publish_now,
            self.state,
            lambda: self._stopping,
        )

    def state(self) -> dict[str, Any]:
        """What ``refstream status`` shows in its workers table under ``presence_name``."""
        return {
            "consumer": self.name,
            "group": self.group,
            "state": "blocked" if self.gate.blocked else "running",
            "reasons": self.gate.reasons,
            "since": self.gate.since,
            **self.totals(),
        }

    def _gate_changed(self, gate: Gate) -> None:
        if self._on_gate is not None:
            self._on_gate(gate)
        self._publish_now.set()

    async def _leave(self) -> None:
        """A clean stop (``joining.leave``)."""
        joined = [p for p, joined in self._joined.items() if joined]
        await joining.leave(self.redis, self.keys, self.group, self.name, self.presence_name, self.role, joined)
