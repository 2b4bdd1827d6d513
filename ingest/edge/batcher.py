"""Micro-batching: the Redis commands of concurrent requests share one round trip.

Each request hands its commands to ``RedisBatcher.execute`` and awaits its own results.
One flusher task sends everything queued so far as one non-transactional pipeline; while
that round trip is in flight the next requests queue up, so batches grow with load and
an idle edge adds no delay. A pipeline is not a transaction: commands may touch keys in
different cluster slots (the cluster client splits the pipeline by node).

Scripts (``script``): on one Redis server (not a Cluster: keys in many slots), the script
calls that lead the requests of a round trip go as one EVALSHA of a script holding them all
(``ingest.edge.scripts``): the rate limits of all its requests are decided together, each
exactly, and each request is handed its own script's reply (``scripts.Scripts``).

Backpressure: nothing waits on Redis for longer than the deadline
(``REFSTREAM_REDIS_DEADLINE_MS``): a request's wait (queue and round trip), a round trip
(a blackholed connection that never resets), a connect. Past ``REFSTREAM_REDIS_MAX_QUEUED``
queued commands a request fails at once. After a round trip fails, Redis is taken for down
(``RedisDown``; the breaker: ``ingest.link.breaker``): requests fail at once, except one
every probe interval (50 ms, doubling to 1 s) whose round trip tells whether it is back.
Every one of these errors is a ``NotSent`` (refused at once) or an ``OutcomeUnknown``
(``LOST``: the deadline): to a route, Redis being unavailable (public routes spool, keyed
routes answer 503).

Durability (``ingest.link.durability``): a round trip holding a request that wrote an event
(``durable=True``) ends with WAIT / WAITAOF; when that is not confirmed those requests get
the outcome ``UNCONFIRMED`` holding their own replies (the primary ran them), and, as for a Redis that
is down, durable requests then fail at once (``Undurable``, nothing sent) but one per
probe interval until a confirmation comes back.

Scripts the server forgot (NOSCRIPT: a restart, SCRIPT FLUSH): a NOSCRIPT reply means the
script did not run, so the batcher loads its scripts and sends exactly those commands again,
in a round trip of their own (merged again where they were) that ends with its own WAIT /
WAITAOF when any of them belongs to a durable request: an event a rerun appends is
confirmed as any other, and a rerun short of the level fails the batch's durable requests
with the outcome ``UNCONFIRMED``.

What a failed ``execute`` tells its caller (a route decides from it what to answer; the
branches are ``ingest.contract.errors``'):

- nothing was sent to Redis (``errors.NotSent``): ``RedisNotSent`` and its kinds
  ``RedisDown`` (the breaker is open) and ``Backpressure`` (the queue cap), and
  ``Undurable`` (the durability breaker refused before sending). The commands never ran.
- sent, outcome unknown (``errors.OutcomeUnknown``), its ``reason`` saying which way:
  ``LOST`` (the deadline, the link's socket timeout, a connection lost after the write or a
  connect that failed: the commands may still run when a stalled Redis resumes, even on a
  connection the edge closed), ``REPLY`` (a reply of the wrong shape: see ``execute``'s
  ``check``), ``RERUN`` (the scripts could not be loaded again after the round trip ran)
  and ``UNCONFIRMED`` (ran on the primary, short of the durability level).

Nothing it raises or hands back is redis-py's: the link translates (``ingest.link.errors``),
and an error reply in a command's slot is a ``Rejected`` (the command did not run).

Every reply handed to a request is its own (docs/guarantees.md): the link never reuses a
connection whose round trip ended early (``ingest.link.resp``), a reply list of the wrong
length fails the whole batch, and each request's slice is cut at its own commands.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ingest.contract import background
from ingest.contract.connections import Command, Redis, cancelled_meanwhile
from ingest.contract.errors import NotSent, OutcomeUnknown, Unknown
from ingest.contract.layout import PartitionGone
from ingest.edge import scripts
from ingest.link.breaker import Breaker
from ingest.link.choice import link_for
from ingest.link.durability import Durability, Undurable
from ingest.link.errors import Rejected, impossible


class RedisNotSent(NotSent):
    """Refused before anything of the request was sent to Redis: its commands never ran."""


class Backpressure(RedisNotSent):
    """More commands wait for Redis than ``REFSTREAM_REDIS_MAX_QUEUED``: refused at once."""


class RedisDown(RedisNotSent):
    """The last round trip failed and no probe has succeeded since: refused at once."""


Check = Callable[[list[Any]], bool]


class _Item:
    __slots__ = ("check", "commands", "due", "durable", "fut")

    def __init__(
        self,
        commands: tuple[Command, ...],
        durable: bool,
        fut: asyncio.Future[list[Any]],
        due: float,
        check: Check | None,
    ) -> None:
        self.commands = commands
        self.durable = durable
        self.fut = fut
        self.due = due  # loop time past which its caller stops waiting
        self.check = check


# what makes a round trip fail as a whole: the connection, not a command's reply
_LINK_FAILURES = (Unknown.LOST, Unknown.REPLY)


def _late(deadline_s: float, what: str) -> OutcomeUnknown:
    return OutcomeUnknown(f"{what} within {deadline_s * 1000:.0f} ms", Unknown.LOST)


class RedisBatcher:
    def __init__(
        self,
        redis: Redis,
        *,
        max_commands: int = 2048,
        deadline_s: float = 1.0,
        max_queued: int = 20_000,
        durability: Durability | None = None,
        observe: Callable[[int, float], None] | None = None,
        merge: bool = True,
    ) -> None:
        self._link = link_for(redis)
        # the scripts leading the requests of a round trip go as one (``ingest.edge.scripts``);
        # one server only: on a Cluster their keys live in different slots
        self._merge = merge and self._link.direct
        self._max = max_commands
        self._deadline = deadline_s
        self._max_queued = max_queued
        self._durability = durability or Durability()
        self._observe = observe  # (commands, seconds) of each round trip
        self._queue: deque[_Item] = deque()
        self._queued = 0  # commands in the queue
        # every caller still waiting, by due time (the deadline is the same for all: so in
        # the order they came), and the one timer that fails the overdue ones: one timer for
        # all of them, not one armed and cancelled per request
        self._waiting: deque[_Item] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # the flusher's, set as it starts
        self._scripts = scripts.Scripts()
        # told the stream of each append that found its partition gone (the layout's watch)
        self.gone: Callable[[str | None], None] | None = None
        self.down = Breaker("redis.down")
        self.undurable = Breaker("redis.not_durable")

    def script(self, body: str, *, keeps_memo: bool = False) -> str:
        """Register a Lua script's body (``ingest.edge.scripts``, which says what
        ``keeps_memo`` promises); returns the sha to use in ``("EVALSHA", sha, ...)``: its
        standalone script's."""
        return self._scripts.register(body, keeps_memo=keeps_memo)

    async def execute(self, *commands: Command, durable: bool = False, check: Check | None = None) -> list[Any]:
        """Run ``commands`` in the next round trip; a failed command's slot holds its error.

        ``durable``: the commands write an event, acknowledged at the configured durability
        level or not at all (``Undurable``, or the outcome ``UNCONFIRMED``). Within the
        deadline or an ``OutcomeUnknown`` (``LOST``).
        ``check``: False for replies (this request's, in order) that cannot answer its
        commands; then the connection is taken for out of step: dropped, and every request
        of the round trip fails with the outcome unknown (``REPLY``), never handed
        replies that may be another's. The module doc lists what each error means."""
        if not self.down.allow():
            raise RedisDown(f"Redis is unavailable ({self.down.cause}); probing")
        if durable and self._durability.waits and not self.undurable.allow():
            raise Undurable(f"writes are not confirmed at the durability level ({self.undurable.cause}); probing")
        if self._queued + len(commands) > self._max_queued:
            raise Backpressure(f"{self._queued} Redis commands queued already (REFSTREAM_REDIS_MAX_QUEUED)")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="redis-batcher")
            self._loop = asyncio.get_running_loop()
        loop = self._loop  # the flusher's: asyncio.get_running_loop() costs a getpid() a call
        item = _Item(commands, durable, loop.create_future(), loop.time() + self._deadline, check)
        self._queue.append(item)
        self._queued += len(commands)
        self._waiting.append(item)
        if self._timer is None:
            self._timer = loop.call_at(item.due, self._expire)
        self._wake.set()
        return await item.fut  # failed by _expire when overdue: the flusher then skips it

    def _expire(self) -> None:
        """Fail the callers whose deadline passed; wake again at the next one's."""
        self._timer = None
        loop = self._loop
        now = loop.time()
        waiting = self._waiting
        while waiting and (waiting[0].fut.done() or waiting[0].due <= now):
            item = waiting.popleft()
            if not item.fut.done():
                item.fut.set_exception(_late(self._deadline, "Redis did not answer"))
        if waiting:
            self._timer = loop.call_at(waiting[0].due, self._expire)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await background.stopped(self._task, "redis batcher")
        self._task = None
        await self._link.close()
        self._fail_queued(RedisNotSent("edge shutting down"))

    def _fail_queued(self, exc: Exception) -> None:
        for item in self._queue:
            if not item.fut.done():
                item.fut.set_exception(exc)
        self._queue.clear()
        self._queued = 0
        if not any(not item.fut.done() for item in self._waiting):
            self._waiting.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch: list[_Item] = []
                n = 0
                while self._queue and (not batch or n + len(self._queue[0].commands) <= self._max):
                    item = self._queue.popleft()
                    self._queued -= len(item.commands)
                    if not item.fut.done():  # else its caller gave up waiting
                        batch.append(item)
                        n += len(item.commands)
                if batch:
                    await self._flush(batch)
                    cancelled_meanwhile()  # a cancel a client library lost must still end the loop (close awaits it)

    async def _flush(self, batch: list[_Item]) -> None:
        # nothing may escape: the flusher must outlive any failure, and every caller of
        # this batch must hear the outcome (connection lost, timeout, a failed reload)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self._deadline):
                results, unconfirmed = await self._send(batch)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and not isinstance(exc, OutcomeUnknown):
                exc = _late(self._deadline, "no reply from Redis")
            for item in batch:
                if not item.fut.done():
                    item.fut.set_exception(exc)
            if isinstance(exc, OutcomeUnknown) and exc.reason in _LINK_FAILURES and self.down.failed(exc):
                # queued behind a dead round trip: each would wait out its own deadline
                self._fail_queued(RedisDown(f"Redis is unavailable ({exc})"))
            return
        self.down.succeeded()
        if self._observe is not None:
            self._observe(sum(len(item.commands) for item in batch), time.perf_counter() - start)
        if unconfirmed is not None:
            self.undurable.failed(unconfirmed)
            self._link.short_of_level()  # behind Sentinel: ask again where the primary is
        elif self._durability.waits and any(item.durable for item in batch):
            self.undurable.succeeded()
        i = 0
        for item in batch:
            if not item.fut.done():
                if item.durable and unconfirmed is not None:  # with what the primary did of it
                    item.fut.set_exception(unconfirmed.for_request(results[i : i + len(item.commands)]))
                else:
                    item.fut.set_result(results[i : i + len(item.commands)])
            i += len(item.commands)
            item.commands = ()  # it may wait in _waiting until the timer passes: not its payload
        # the answered callers at the head of _waiting go now, not when the timer next passes
        # (a deadline after they came): at a few thousand requests a second, a second's worth
        # of items and futures kept alive was what the collector's young generation walked
        waiting = self._waiting
        while waiting and waiting[0].fut.done():
            waiting.popleft()

    async def _send(self, batch: list[_Item]) -> tuple[list[Any], OutcomeUnknown | None]:
        flat = [cmd for item in batch for cmd in item.commands]
        waits = self._durability.waits
        lead = self._scripts.leading([item.commands for item in batch]) if self._merge else []
        results, unconfirmed = await self._round_trip(flat, waits and any(item.durable for item in batch), lead)
        retry = [i for i, r in enumerate(results) if _is_noscript(r)]
        if retry:
            # Redis restarted or flushed its script cache; NOSCRIPT: the script did not run
            try:
                await self._link.load_scripts(list(self._scripts.sources.values()))
            except Rejected as exc:  # the round trip ran: what it did is its callers' unknown
                raise OutcomeUnknown(f"the scripts could not be loaded again: {exc}", Unknown.RERUN) from exc
            durable = [item.durable for item in batch for _ in item.commands]
            led = set(lead)
            again, short = await self._round_trip(
                [flat[i] for i in retry],
                waits and any(durable[i] for i in retry),
                [k for k, i in enumerate(retry) if i in led],
            )
            for i, r in zip(retry, again, strict=True):
                results[i] = r
            unconfirmed = unconfirmed or short
        for i, r in enumerate(results):
            if (r is None and flat[i][0] == "XADD") or (isinstance(r, Rejected) and r.code == "GONE"):
                stream = str(flat[i][1]) if r is None else str(r)[5:]
                results[i] = PartitionGone(f"GONE {stream}")
                if self.gone is not None:
                    self.gone(stream)
            elif isinstance(r, Rejected) and r.code == "STALE":
                # routed by a partition count that changed since: refused, and read again now
                results[i] = PartitionGone(str(r))
                if self.gone is not None:
                    self.gone(None)
        i = 0
        for item in batch:
            n = len(item.commands)
            if item.check is not None and not item.check(results[i : i + n]):
                await self._link.close()  # out of step, or worse: nothing more on that connection
                name = item.commands[0][0] if item.commands else "?"
                raise impossible(f"a reply of the wrong shape to {name}: connection dropped")
            i += n
        return results, unconfirmed

    async def _round_trip(
        self, commands: list[Command], wait: bool, lead: list[int]
    ) -> tuple[list[Any], OutcomeUnknown | None]:
        """One round trip; with ``wait``, ended by the durability command (after the writes,
        on the same connection), whose failure is returned beside the replies. With two or
        more ``lead`` (``scripts.Scripts.leading``), those calls go first as one merged script."""
        merge = len(lead) > 1
        if merge:
            commands = self._scripts.merge(commands, lead)
        sent = [*commands, self._durability.command()] if wait else commands
        results = list(await self._link.send(sent))
        if len(results) != len(sent):
            await self._link.close()
            raise impossible(f"{len(results)} replies to {len(sent)} commands: connection dropped")
        unconfirmed = self._durability.failure(results.pop()) if wait else None
        if merge:
            split = self._scripts.split(results, lead)
            if split is None:
                await self._link.close()
                raise impossible(f"the merged script answered a {type(results[0]).__name__}: connection dropped")
            results = split
        return results, unconfirmed


def _is_noscript(r: object) -> bool:
    return isinstance(r, Rejected) and r.code == "NOSCRIPT"
