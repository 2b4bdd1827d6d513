"""What every phase of one bench run shares: options, processes, the world, Redis, and the
figures measured so far in this run (ratios are only ever taken within one run)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from ingest.contract.connections import Redis
from ingest.contract.keys import Keys

from . import wrk
from .procs import Proc, Procs
from .world import World

# n: (a) and each (b) dialect again with N processes (serve --processes N, N = the CPU count)
PARTS = (
    "a",
    "b000",
    "b002",
    "b003",
    "b004",
    "b004sale",
    "batch",
    "c",
    "cap",
    "con",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "imp",
    "m",
    "n",
    "p",
    "pgbytes",
    "r",
    "shards",
)
# only when named in --only: (cap) capacity, CPU per event of each kind of process (minutes, a
# Redis of its own), (con) ten open consoles' cost at half load, (h) starts Redis servers of its
# own, (i) idempotency keys' cost, (m) a partition's MIGRATE between two Redis servers of its own,
# (p) fills an events table with millions of rows, (r) the archiver and retention, (imp) a
# million-row import beside live load, (pgbytes) Postgres bytes per stored click, by table and index,
# (shards) the worker on one Postgres primary and on two, each a server of its own
DEFAULT_PARTS = tuple(p for p in PARTS if p not in ("cap", "con", "h", "i", "imp", "m", "p", "pgbytes", "r", "shards"))


def _py_spy() -> str:
    """py-spy from this venv (pip install py-spy), else from PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


def say(msg: str) -> None:
    """A progress line on stderr, timed: ``[bench 12:34:56] msg``."""
    click.echo(f"[bench {time.strftime('%H:%M:%S')}] {msg}", err=True)


@dataclass(frozen=True, slots=True)
class Options:
    duration: float
    warmup: float
    runs: int
    only: frozenset[str]
    connections: int
    batch_connections: int
    backlog_seconds: float
    drain_events: int
    workers: int
    partitions: int
    batch_size: int
    profile_dir: Path | None
    fill_rows: int = 20_000_000
    import_events: int = 1_000_000
    import_live_rate: float = 500.0
    import_args: tuple[str, ...] = ()  # more `refstream import` options, for the first run
    pgbytes_clicks: int = 20_000
    con_rate: float | None = None  # (con) the windows' load; None: half of (e)'s full load
    settings: tuple[tuple[str, str], ...] = ()  # ``--set``: (field, value) for the edge's and workers' processes


@dataclass(slots=True)
class Ctx:
    opts: Options
    procs: Procs
    world: World
    redis: Redis
    prefix: str  # bench:<random>
    run: int
    figures: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)  # name -> raw py-spy output path

    def keys(self, phase: str) -> Keys:
        return Keys(f"{self.prefix}:r{self.run}:{phase}", self.opts.partitions)

    def wants(self, part: str) -> bool:
        return part in self.opts.only

    def note(self, name: str, value: float) -> None:
        self.figures[name] = round(value, 3)

    def rss(self, kind: str, proc: Proc) -> None:
        key = f"g.{kind}_rss_mb"
        self.note(key, max(self.figures.get(key, 0.0), proc.current_peak_rss_mb()))

    def profile(self, name: str, pid: int, duration: float | None) -> list[subprocess.Popen[bytes]]:
        """py-spy on ``pid`` (raw collapsed stacks and an SVG) when --profile is given."""
        if self.opts.profile_dir is None:
            return []
        self.opts.profile_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
            path = self.opts.profile_dir / f"{name}_profile.{ext}"
            argv = [_py_spy(), "record", "--nonblocking", "--format", fmt, "-o", str(path), "--pid", str(pid)]
            if duration is not None:
                argv += ["-d", str(max(1, round(duration)))]
            out.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if fmt == "raw":
                self.profiles[name] = str(path)
        return out

    async def wrk(
        self,
        name: str,
        base_url: str,
        requests: list[wrk.Request],
        *,
        connections: int,
        server_pid: int | None = None,
        profile: str | None = None,
        on_start: Callable[[], Awaitable[None]] | None = None,
        per_request: bool = False,
        unique: str | None = None,
    ) -> wrk.WrkResult:
        """Warm-up, then the measured run; its figures recorded under ``name``."""
        o = self.opts
        await asyncio.to_thread(
            wrk.run,
            base_url,
            requests,
            duration=o.warmup,
            connections=connections,
            per_request=per_request,
            unique=unique,
        )
        if on_start is not None:
            await on_start()
        spies = self.profile(profile, server_pid, o.duration) if profile and server_pid else []
        r = await asyncio.to_thread(
            wrk.run,
            base_url,
            requests,
            duration=o.duration,
            connections=connections,
            server_pid=server_pid,
            per_request=per_request,
            unique=unique,
        )
        for spy in spies:
            await asyncio.to_thread(spy.wait, 60)
        self.note(f"{name}.rps", r.rps)
        self.note(f"{name}.p50_ms", r.p50_ms)
        self.note(f"{name}.p99_ms", r.p99_ms)
        self.note(f"{name}.errors", r.errors)
        self.note(f"{name}.wrk_cpu", r.wrk_cpu)
        self.note(f"{name}.server_cpu", r.server_cpu)
        return r
