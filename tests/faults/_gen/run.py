"""One seed, start to end: its schedule drawn, its cluster up, the clients and the nemesis
run together, everything healed, the drain awaited (a condition, not a sleep), the checker
run over the whole history. A seed with anomalies keeps its process logs, its history and
its schedule in ``$TMPDIR/refstream-gen-<seed>/``."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .._plan import Plan
from .._servers import PgServer
from .checker import Anomalies, GenChecker
from .client import CROSSED, Clients
from .cluster import Cluster
from .faults import nemesis
from .history import History
from .schedule import Schedule, draw, only_from_env
from .shards import ShardedChecker


@dataclass
class SeedResult:
    seed: int
    mode: str
    schedule: Schedule
    ops: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: Anomalies = field(default_factory=Anomalies)
    wall_s: float = 0.0
    stored: int = 0  # event rows
    archived: int = 0  # archive segment lines
    copied: tuple[int, int] = (0, 0)  # events in more than one line (stream entry), most lines of one
    lost_with_redis: int = 0  # stored, never 2xx'd, in no line: a failover lost the entry (checker.py)
    bursts: int = 0  # click_burst flags judged (checker.py)
    repeats: Counter[str] = field(default_factory=Counter)  # Dub's clicks again from one browser (checker.py)
    crossed: int = 0  # attempts the client library answered with another request's answer (client.py)
    shards: Counter[str] = field(default_factory=Counter)  # moved, dropped, outages, move-retries (faults.py)
    kept: Path | None = None

    def reproduce(self) -> str:
        only = ",".join(sorted(only_from_env()))
        return (
            f"REFSTREAM_FAULTS={self.mode} REFSTREAM_GEN_SEED={self.seed}"
            + (f" REFSTREAM_GEN_FAULTS={only}" if only else "")
            + " scripts/faults -k generative"
        )

    def line(self) -> str:
        def fmt(c: Counter[str]) -> str:
            return ",".join(f"{k}={n}" for k, n in sorted(c.items())) or "none"

        return (
            f"GENERATIVE[{self.mode}] seed={self.seed} topology={self.schedule.topology} wall={self.wall_s:.0f}s"
            f" ops={sum(self.ops.values())} ({fmt(self.ops)}) attempts ({fmt(self.attempts)})"
            f" crossed-answers={self.crossed}"
            f" stored={self.stored} burst-flags={self.bursts} dub-repeats ({fmt(self.repeats)})"
            f" archived={self.archived}"
            " (unarchived, never 2xx'd, lost in a failover:"
            f" {self.lost_with_redis})"
            f" (events in 2+ lines: {self.copied[0]}, at most {self.copied[1]})"
            f" faults={sum(self.faults.values())} ({fmt(self.faults)})"
            f" shards (placed {','.join(f'{t}:{x}' for t, x in sorted(self.schedule.placed.items()))};"
            f" {fmt(self.shards)})"
            f" anomalies={sum(self.anomalies.counts().values())} ({fmt(self.anomalies.counts())})"
        )


async def run_seed(seed: int, mode: str, pg: PgServer, plan: Plan, shard_pg: PgServer) -> SeedResult:
    """``shard_pg``: the Postgres of shard ``b`` (each seed a database of its own there)."""
    schedule = draw(seed, mode, only_from_env())
    result = SeedResult(seed, mode, schedule)
    started = time.monotonic()
    cluster = Cluster(f"generative-{seed}", pg, schedule.topology, plan, shard_pg, schedule.placed)
    try:
        world = await cluster.up()
        st = cluster.st
        history = History(seed)
        clients = Clients(history, world, cluster.edges, cluster.command)
        nemesis_run = asyncio.create_task(nemesis(schedule.faults, cluster, history))
        try:
            await clients.run(schedule.ops)
        finally:
            nemesis_problems = await nemesis_run
        extra: dict[str, list[str]] = {"nemesis": nemesis_problems, "process_exit": await cluster.heal()}
        drained, left = await st.check.wait_drained(time.monotonic(), plan.drain_timeout_s)
        if drained is None:
            extra["not_drained"] = [f"not drained {plan.drain_timeout_s:.0f}s after the heal: {left[:6]}"]
        checker = GenChecker(
            history,
            world,
            st.check,
            st.tmp / "archive",
            st.keys.prefix,
            sorted(st.tmp.glob("*.log")),
            clients.outputs,
            edge=cluster.edges()[0][1],
        )
        extra["placement"] = await cast(ShardedChecker, st.check).placement_problems(
            {ws: tag for tag, ws in cluster.workspaces.items()}
        )
        result.anomalies = await checker.run(extra)
        result.shards = cluster.shards
        result.stored, result.archived = checker.stored, checker.archived_lines
        result.bursts = checker.bursts
        result.repeats = checker.repeats
        result.crossed = sum(1 for o in history.ops.values() for a in o.attempts if a.error == CROSSED)
        result.lost_with_redis = len(checker.lost_with_redis)
        if checker.lost_with_redis:
            print(
                f"seed {seed}: stored, never answered 2xx, lost from Redis in a failover before it was"
                f" archived: {checker.lost_with_redis}"
            )
        many = [n for n in checker.copies.values() if n > 1]
        result.copied = (len(many), max(many, default=0))
        result.ops, result.attempts = history.ops_by_kind(), history.attempts_by_outcome()
        result.faults = history.faults_by_kind()
        result.wall_s = time.monotonic() - started
        if result.anomalies.found:
            servers = [s.log for s in cluster.servers] + ([cluster.sentinel.log] if cluster.sentinel else [])
            result.kept = _keep(result, history, st.tmp, servers)
            (result.kept / "moves.txt").write_text("".join(f"{e}\n" for e in cluster.move_errors))
            (result.kept / "state.txt").write_text(await _state(st.check))
            await _dump(result.kept, {"default": (pg, st.database), "b": (shard_pg, st.database)})
    finally:
        await cluster.close()
    result.wall_s = time.monotonic() - started
    return result


async def _state(check: Any) -> str:
    """What the checker read the end state from, for a failing seed: the erasures' records
    (digests and times, nothing personal), each stream's length and groups."""
    out = ["erasures:"]
    try:
        for r in await check.fetch(
            "SELECT id, requested_at, since, postgres_at, redis_at, archive_at, generation,"
            " done FROM erasures ORDER BY requested_at"
        ):
            out.append("  " + " ".join(f"{k}={r[k]}" for k in r.keys()))
        async for name in check.redis.scan_iter(match=f"{check.keys.prefix}:events*", count=1000):
            groups = await check.redis.xinfo_groups(name)
            out.append(
                f"{name.decode()} length={await check.redis.xlen(name)} groups="
                + "; ".join(
                    f"{g['name'].decode()} last={g['last-delivered-id'].decode()} pending={g['pending']}"
                    for g in groups
                )
            )
    except Exception as exc:  # the state is for reading; a failure to read it says so
        out.append(f"(not read: {exc!r})")
    return "\n".join(out) + "\n"


async def _dump(kept: Path, shards: dict[str, tuple[PgServer, str]]) -> None:
    """Each shard's Postgres log and its database's data (``pg_dump``), for a failing seed:
    what the checker read, whole, each workspace's frozen copies among it."""
    for name, (server, database) in shards.items():
        if server.log.exists():
            shutil.copy(server.log, kept / f"postgres-{name}.log")
        proc = await asyncio.create_subprocess_exec(
            str(server.bin / "pg_dump"),
            "--data-only",
            "--dbname",
            server.url_for(database),
            "--file",
            str(kept / f"dump-{name}.sql"),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode:
            (kept / f"dump-{name}.sql").write_text(f"-- pg_dump exited {proc.returncode}: {err.decode()[-500:]}\n")


def _keep(result: SeedResult, history: History, tmp: Path, server_logs: list[Path]) -> Path:
    """The failing seed's logs (its processes', Redis's and Sentinel's), history, schedule,
    archive and anomalies, kept past the stage's end (``_dump``: the shards')."""
    kept = Path(tempfile.gettempdir()) / f"refstream-gen-{result.seed}"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for log in [*tmp.glob("*.log"), *(p for p in server_logs if p.exists())]:
        shutil.copy(log, kept / log.name)
    if (tmp / "archive").is_dir():  # the segments, for an archive anomaly
        shutil.copytree(tmp / "archive", kept / "archive")
    (kept / "history.txt").write_text(history.dump())
    (kept / "schedule.txt").write_text(f"seed {result.seed} {result.schedule.topology}\n{result.schedule.describe()}\n")
    (kept / "anomalies.txt").write_text(result.line() + "\n" + result.anomalies.report(limit=None) + "\n")
    return kept
