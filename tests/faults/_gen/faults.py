"""The nemesis: each fault kind is a small class whose ``start`` breaks one thing and whose
``stop`` heals it, and ``nemesis`` runs a schedule's faults at their times, each held for its
duration, while the clients run. Whatever a fault leaves behind, ``Cluster.heal`` puts back
before the final drain.

Kinds (``schedule.ALL_FAULTS``): Redis stalled (SIGSTOP), killed, restarted (SIGTERM) or full
(``maxmemory`` at its used memory, ``noeviction``); a Sentinel failover (``SENTINEL
FAILOVER``, replicas:1); Postgres killed (``-m immediate``), read-only or slow (a delay on
every chunk of its links); an edge, worker or archiver SIGKILLed (and replaced) or
SIGSTOPped; one process restarted with its clock offset (``REFSTREAM_CLOCK_OFFSET_S``); a
network partition that blackholes one direction of one link; a worker trimming every second
with no retention and a tiny memory budget; ``refstream replay`` racing the workers; the
partition count changed live (``refstream partitions set``) and changed back; an edge's
supervisor replaced by ``refstream serve --take-over``; shard b's Postgres stopped and
started again; a workspace moved to the other shard under load (``refstream workspace
move``), its old copy dropped (``--drop-old``) after it or before its next move.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from abc import ABC, abstractmethod
from typing import ClassVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...conftest import wait_for
from .._sentinel import MASTER
from .._servers import FaultRedis
from .cluster import Cluster, Slot
from .history import FaultRecord, History
from .schedule import ALL_FAULTS, SHARDS, FaultStep


class Fault(ABC):
    kind: ClassVar[str]

    def __init__(self, step: FaultStep, cluster: Cluster, record: FaultRecord) -> None:
        self.step, self.c, self.record = step, cluster, record

    def slot(self) -> Slot:
        role, _, index = self.step.target.partition("/")
        return self.c.slots[role][int(index)]

    @abstractmethod
    async def start(self) -> None:
        """Break it."""

    @abstractmethod
    async def stop(self) -> None:
        """Heal it (called once, after the fault's duration)."""


class RedisStall(Fault):
    kind = "redis-stall"

    async def start(self) -> None:
        self.server = await self.c.primary()
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGSTOP)
        self.record.target = f"redis:{self.server.port}"

    async def stop(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGCONT)


class RedisKill(Fault):
    kind = "redis-kill"
    sig = signal.SIGKILL

    async def start(self) -> None:
        self.server: FaultRedis = await self.c.primary()
        assert self.server.proc is not None
        self.record.target = f"redis:{self.server.port}"
        self.server.proc.send_signal(signal.SIGCONT)  # a stalled one must hear SIGTERM
        self.server.proc.send_signal(self.sig)
        await asyncio.to_thread(self.server.proc.wait, 30)

    async def stop(self) -> None:
        await self.c.restart_redis(self.server)


class RedisRestart(RedisKill):
    kind = "redis-restart"
    sig = signal.SIGTERM  # a clean shutdown: the AOF flushed, then started again


class RedisFull(Fault):
    kind = "redis-full"

    async def start(self) -> None:
        self.server = await self.c.primary()
        self.record.target = f"redis:{self.server.port}"
        self.admin = self.c.admin(self.server)
        self.limit = int((await self.admin.info("memory"))["used_memory"])
        await self.admin.config_set("maxmemory", self.limit)
        self.healed = asyncio.Event()
        self.holding = asyncio.create_task(self._hold())

    async def _hold(self) -> None:
        """Memory the workers free (acks, trims) is taken back at once: full all along.
        Ended by ``healed``, not by a cancel: redis-py can turn a cancel that lands in a
        command into a timeout (an OSError), and a loop that took it for an outage went on
        lowering the limit after the heal, leaving Redis full for the rest of the run
        (generative seed 434954979)."""
        while not self.healed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self.healed.wait()
            if self.healed.is_set():
                return
            try:
                used = int((await self.admin.info("memory"))["used_memory"])
                if used < self.limit:
                    self.limit = used
                    await self.admin.config_set("maxmemory", used)
            except (RedisError, OSError):
                continue

    async def stop(self) -> None:
        self.healed.set()
        try:
            await self.holding  # its last CONFIG SET is answered before the heal's
            await self.admin.config_set("maxmemory", 0)
        finally:
            await self.admin.aclose()


RETRY_FAILOVER_S = 12.0  # past Sentinel's failover-timeout (5 s) twice: it takes a new one
FAILOVER_TRIES = 3


class SentinelFailover(Fault):
    kind = "sentinel-failover"

    async def start(self) -> None:
        assert self.c.sentinel is not None
        self.old = await self.c.sentinel.master_port()
        async with aioredis.Redis(port=self.c.sentinel.port, socket_timeout=5) as s:
            try:
                await s.execute_command("SENTINEL", "FAILOVER", MASTER)
            except RedisError as exc:  # e.g. no replica good enough yet: noted, nothing broken
                self.record.note = f"refused: {exc}"
        self.record.target = f"from redis:{self.old}"

    async def stop(self) -> None:
        assert self.c.sentinel is not None
        if not self.record.note:
            old, tries = self.old, 1

            async def moved() -> bool:
                assert self.c.sentinel is not None
                return await self.c.sentinel.master_port() not in (old, None)

            # Sentinel gives up a failover whose replica does not report itself primary within
            # its failover-timeout (5 s: a starved machine), and takes a new one 10 s later
            while True:
                try:
                    await wait_for(moved, timeout=RETRY_FAILOVER_S, what="Sentinel to name another primary")
                    break
                except AssertionError:
                    if tries == FAILOVER_TRIES:
                        raise
                tries += 1
                async with aioredis.Redis(port=self.c.sentinel.port, socket_timeout=5) as s:
                    with contextlib.suppress(RedisError):
                        await s.execute_command("SENTINEL", "FAILOVER", MASTER)
            self.record.note = f"to redis:{await self.c.sentinel.master_port()}" + (
                f" (asked {tries} times)" if tries > 1 else ""
            )
        await self.c.settle()


class PgKill(Fault):
    kind = "pg-kill"

    async def start(self) -> None:
        await asyncio.to_thread(self.c.pg.stop, "immediate")

    async def stop(self) -> None:
        self.c.pg.start()  # from the event loop's (main) thread: the parent-death signal belongs to it
        await self.c.pg.ready()


class PgReadOnly(Fault):
    kind = "pg-read-only"

    async def start(self) -> None:
        await self.c.pg.set_read_only(True)

    async def stop(self) -> None:
        await self.c.pg.set_read_only(False)


class PgSlow(Fault):
    kind = "pg-slow"

    async def start(self) -> None:
        for link in ("edge-pg", "worker-pg"):
            self.c.proxies[link].delay_s = self.step.param

    async def stop(self) -> None:
        for link in ("edge-pg", "worker-pg"):
            self.c.proxies[link].delay_s = 0.0


class ProcessKill(Fault):
    kind = "process-kill"

    async def start(self) -> None:
        slot = self.slot()
        self.record.target = f"{slot.role} {slot.name}"
        await self.c.end(slot, signal.SIGKILL)

    async def stop(self) -> None:
        slot = self.slot()
        new = await self.c.start(slot.role, slot.index, **slot.extra)
        self.record.note = f"replaced by {new.name}"


class ProcessStop(Fault):
    kind = "process-stop"

    async def start(self) -> None:
        slot = self.slot()
        self.record.target = f"{slot.role} {slot.name}"
        self.c.send(slot, signal.SIGSTOP)

    async def stop(self) -> None:
        self.c.send(self.slot(), signal.SIGCONT)


class ClockSkew(Fault):
    kind = "clock-skew"

    async def start(self) -> None:
        new = await self.c.replace(self.slot(), REFSTREAM_CLOCK_OFFSET_S=str(self.step.param))
        self.record.target = f"{new.role} {new.name} {self.step.param:+.0f}s"

    async def stop(self) -> None:
        await self.c.replace(self.slot())


class Partition(Fault):
    kind = "partition"

    async def start(self) -> None:
        link, _, direction = self.step.target.partition("/")
        self.proxy = self.c.proxies[link]
        self.proxy.blackhole(direction)

    async def stop(self) -> None:
        self.proxy.heal()


class TrimStorm(Fault):
    kind = "trim-storm"
    ENV: ClassVar[dict[str, str]] = {
        "REFSTREAM_TRIM_EVERY_S": "1",
        "REFSTREAM_STREAM_RETENTION_S": "0",
        "REFSTREAM_STREAM_MAX_BYTES": "64kb",
    }

    async def start(self) -> None:
        st = self.c.st
        name = st.start_worker(**{**self.c.env("worker"), **self.ENV})
        self.extra = Slot("worker", -1, st.workers[name], name)
        self.c.started.append((f"worker {name} (trimming)", st.workers[name]))
        self.record.target = f"worker {name}"

    async def stop(self) -> None:
        await self.c.end(self.extra)


class Replay(Fault):
    kind = "replay"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.c.command("replay", "--since", "30m", "--json"))

    async def stop(self) -> None:
        code, _, err = await self.task
        self.record.note = f"exit {code}" + (f": {err.strip().splitlines()[-1][:200]}" if code and err.strip() else "")


class PartitionCount(Fault):
    """``refstream partitions set N`` while edges and workers run, then back to the stage's
    count: the new partitions are written and read, the old ones retire once empty."""

    kind = "partition-count"

    async def start(self) -> None:
        self.record.target = f"partitions {int(self.step.param)}"
        await self._set(int(self.step.param))

    async def stop(self) -> None:
        await self._set(self.c.st.settings.partitions)

    async def _set(self, n: int) -> None:
        """As an operator would: again until it is done (Redis may be down or stalled by
        another fault meanwhile; every step of the change is idempotent)."""
        deadline = asyncio.get_running_loop().time() + 240  # a starved machine (``Cluster.take_over``)
        while True:
            try:
                code, _, err = await self.c.command("partitions", "set", str(n), "--json", within_s=60)
            except TimeoutError:  # hung on a Redis killed or stalled by another fault: ended, run again
                code, err = -1, "still running after 60 s (killed)"
            if not code:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"refstream partitions set {n} exited {code}: {err.strip()[-300:]}")
            await asyncio.sleep(0.5)  # an operator's pause before trying again


class EdgeTakeOver(Fault):
    """``refstream serve --take-over`` beside an edge: its supervisor replaced, its sockets
    never closed (no request may go unanswered, none may be answered twice)."""

    kind = "edge-takeover"

    async def start(self) -> None:
        slot = self.slot()
        if slot.proc is None or slot.proc.poll() is not None or slot.stopped:
            self.record.note = "skipped: the edge was not running"
            return
        old = await self.c.take_over(slot)
        self.record.target = f"edge {old} -> {slot.name}"

    async def stop(self) -> None:
        pass  # nothing to heal: the new supervisor serves on


class ShardOutage(Fault):
    """Shard b's Postgres stopped (``-m immediate``), then started again: its workspaces'
    events wait in their waiting rooms meanwhile (``workers.consumer.waiting``)."""

    kind = "shard-outage"

    async def start(self) -> None:
        self.record.target = f"shard b (postgres:{self.c.shard_pg.port})"
        await asyncio.to_thread(self.c.shard_pg.stop, "immediate")

    async def stop(self) -> None:
        self.c.shard_pg.start()  # from the event loop's (main) thread, as PgKill
        await self.c.shard_pg.ready()
        self.c.shards["outages"] += 1


MOVE_WITHIN_S = 120.0  # one run of the command: past it, killed and run again (it takes up its step)
MOVE_DEADLINE_S = 300.0  # retried until then (a shard down, Postgres killed): a starved machine's


class WorkspaceMove(Fault):
    """``refstream workspace move WS --to OTHER`` under load, run in the background while the
    fault is held and awaited at its end; again, as an operator runs it, until it is done (a
    run that fails under a fault, or is killed, leaves its step recorded: the next takes it
    up). A workspace whose last move left its old copy has it dropped first (the command
    refuses to move it otherwise); with ``param`` 1, its new old copy is dropped after the
    move (``--drop-old``). A refusal or a failure is never an anomaly; a move that cannot be
    done at all is the nemesis's (``nemesis``), and the checker judges what it left."""

    kind = "workspace-move"

    async def start(self) -> None:
        tag = self.step.target
        self.to = next(s for s in SHARDS if s != self.c.placed[tag])
        self.record.target = f"workspace {tag} {self.c.placed[tag]} -> {self.to}"
        self.task = asyncio.create_task(self._move(tag))

    async def stop(self) -> None:
        self.record.note = await self.task

    async def _move(self, tag: str) -> str:
        ws = self.c.workspaces[tag]
        notes = []
        if tag in self.c.frozen:
            tries = await self._run(tag, "workspace", "move", ws, "--drop-old", done="no switched move")
            notes.append(f"its last move's old copy on {self.c.frozen.pop(tag)} dropped first ({tries} runs)")
            self.c.shards["dropped"] += 1
        tries = await self._run(tag, "workspace", "move", ws, "--to", self.to, done=f"is on {self.to!r} already")
        notes.append(f"moved ({tries} runs)")
        self.c.frozen[tag], self.c.placed[tag] = self.c.placed[tag], self.to
        self.c.shards["moved"] += 1
        if self.step.param:
            tries = await self._run(tag, "workspace", "move", ws, "--drop-old", done="no switched move")
            notes.append(f"old copy on {self.c.frozen.pop(tag)} dropped ({tries} runs)")
            self.c.shards["dropped"] += 1
        return "; ".join(notes)

    async def _run(self, tag: str, *args: str, done: str) -> int:
        """The command until it exits 0 (or says it is done already, after a run of ours
        that did not tell: killed, or cut off before its answer); how many runs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOVE_DEADLINE_S
        runs = 0
        while True:
            runs += 1
            try:
                code, _, err = await self.c.command(*args, "--json", within_s=MOVE_WITHIN_S)
            except TimeoutError:
                code, err = -1, f"still running after {MOVE_WITHIN_S:.0f} s (killed)"
            if not code or (runs > 1 and done in err):
                return runs
            self.c.shards["move-retries"] += 1
            last = (err.strip().splitlines() or [""])[-1][:300]
            self.c.move_errors.append(f"{' '.join(args[:2])} {tag} {args[-2:]} run {runs}: exit {code}: {last}")
            if loop.time() > deadline:
                raise AssertionError(f"refstream {' '.join(args)} not done in {MOVE_DEADLINE_S:.0f} s: {last}")
            await asyncio.sleep(1.0)  # an operator's pause before trying again


KINDS: dict[str, type[Fault]] = {
    f.kind: f
    for f in (
        RedisStall,
        RedisKill,
        RedisRestart,
        RedisFull,
        SentinelFailover,
        PgKill,
        PgReadOnly,
        PgSlow,
        ProcessKill,
        ProcessStop,
        ClockSkew,
        Partition,
        TrimStorm,
        Replay,
        PartitionCount,
        EdgeTakeOver,
        ShardOutage,
        WorkspaceMove,
    )
}


async def nemesis(steps: list[FaultStep], cluster: Cluster, history: History) -> list[str]:
    """Run every fault at its time for its duration; the nemesis's own failures (a fault
    that could not be started or healed), each a sentence."""
    problems: list[str] = []
    # a heal may take longer than the schedule allowed for (a failover settling): the next
    # fault on the same resource waits for it, so two never overlap
    locks = {resource: asyncio.Lock() for resource, _ in ALL_FAULTS.values()}

    async def one(step: FaultStep) -> None:
        delay = step.at - history.now()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule's time, not a synchronisation
        async with locks[ALL_FAULTS[step.kind][0]]:
            record = FaultRecord(step.kind, step.target, history.now())
            history.faults.append(record)
            fault = KINDS[step.kind](step, cluster, record)
            try:
                await fault.start()
            except Exception as exc:
                problems.append(f"{record.line()}: could not start: {exc!r}")
                return
            await asyncio.sleep(step.hold)  # the fault, held
            try:
                await fault.stop()
            except Exception as exc:
                problems.append(f"{record.line()}: could not heal: {exc!r}")
            record.healed = history.now()

    await asyncio.gather(*(one(s) for s in steps))
    return problems
