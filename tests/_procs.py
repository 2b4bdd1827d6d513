"""Running `refstream` as real processes, the way the README does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, overload

import aiohttp
import orjson

from ingest.contract.settings import Settings
from refstream.embedded import free_port as free_port  # the tests take it from here, with the processes

REFSTREAM = str(Path(sys.executable).parent / "refstream")
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m tests._failpoint` finds tests/


def dev_ports() -> list[str]:
    """`refstream dev`'s arguments for its two ports, each found free: the console's
    default (--port + 10) may be where another test's server listens."""
    port = free_port()
    console = next(p for p in iter(free_port, None) if p != port)
    return ["--port", str(port), "--console-port", str(console)]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFSTREAM_")}
    env.update(
        REDIS_URL=settings.redis_url,
        DATABASE_URL=settings.database_url,
        REFSTREAM_STREAM_PREFIX=settings.stream_prefix,
        REFSTREAM_PARTITIONS=str(settings.partitions),
        REFSTREAM_BLOCK_MS=str(settings.block_ms),
        REFSTREAM_CLAIM_IDLE_MS=str(settings.claim_idle_ms),
        REFSTREAM_ARCHIVE_SEGMENT_S=str(settings.archive_segment_s),  # below the claim idle time
        REFSTREAM_RECLAIM_EVERY_S=str(settings.reclaim_every_s),
        REFSTREAM_CLICK_RATE_LIMIT_PER_MIN=str(settings.click_rate_limit_per_min),
        REFSTREAM_SECRET_KEY=settings.secret_key or "",
        REFSTREAM_SPOOL_DIR=settings.spool_dir,
        REFSTREAM_SPOOL_DRAIN_EVERY_S=str(settings.spool_drain_every_s),
        REFSTREAM_EVENT_RETENTION_DAYS=str(settings.event_retention_days),
        REFSTREAM_DEDUPE_RETENTION_DAYS=str(settings.dedupe_retention_days),
        # one edge process unless a test asks for more (tests/test_prefork.py): the suite's
        # edges start as fast as they did, and their pid is the process that serves
        REFSTREAM_PROCESSES="1",
    )
    if settings.redis_cluster:
        env["REFSTREAM_REDIS_CLUSTER"] = "true"
    if settings.arq_redis_url:
        env["REFSTREAM_ARQ_REDIS_URL"] = settings.arq_redis_url
    env.update(extra)
    return env


async def run_command(*args: str, env: dict[str, str], within_s: float = 60) -> tuple[int, str, str]:
    """``refstream *args`` to its end: (exit code, stdout, stderr). Killed if it does not end."""
    proc = await asyncio.create_subprocess_exec(
        REFSTREAM, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class CliError(AssertionError):
    pass


class PortTaken(Exception):
    pass


class Procs:
    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def start(self, *args: str, failpoint: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """``refstream *args``; with a ``failpoint`` (tests/_failpoint.py), through the
        wrapper that makes the process kill itself at that step."""
        self._n += 1
        log = open(self.logdir / f"{self._n:02d}-{args[0]}.log", "wb")
        command = [REFSTREAM] if failpoint is None else [sys.executable, "-m", "tests._failpoint", failpoint]
        proc = subprocess.Popen(
            [*command, *args],
            env=env_for(self.settings, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=None if failpoint is None else _ROOT,
        )
        log.close()
        self.running.append(proc)
        return proc

    async def start_edge(self, **env: str) -> str:
        for _ in range(3):  # a port another test bound between free_port() and the edge's bind
            try:
                return await self._start_edge(free_port(), **env)
            except PortTaken:
                continue
        raise AssertionError(f"three free ports were taken before the edge bound them: {self.logs()}")

    async def _start_edge(self, port: int, **env: str) -> str:
        proc = self.start("serve", "--port", str(port), **env)
        log = self.logdir / f"{self._n:02d}-serve.log"
        base = f"http://127.0.0.1:{port}"
        deadline = asyncio.get_running_loop().time() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.poll() is not None:
                    if f"port {port} on 127.0.0.1 is in use" in log.read_text(errors="replace"):
                        self.running.remove(proc)
                        raise PortTaken(port)
                    raise AssertionError(f"edge exited with {proc.returncode}: {self.logs()}")
                try:
                    async with http.get(f"{base}/healthz") as r:
                        if r.status == 200:
                            return base
                except aiohttp.ClientConnectionError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"edge not healthy: {self.logs()}")
                await asyncio.sleep(0.05)

    # A test passes its environment as ``**env`` (often a ``dict[str, str]``) and at most one
    # of ``check`` and ``timeout``: one signature per shape, so that no ``dict[str, str]`` is
    # taken to fill the ``bool`` or the ``float``.
    @overload
    async def cli(self, *args: str, **env: str) -> Any: ...
    @overload
    async def cli(self, *args: str, check: bool, **env: str) -> Any: ...
    @overload
    async def cli(self, *args: str, timeout: float, **env: str) -> Any: ...
    async def cli(self, *args: str, **options: Any) -> Any:
        """Run a command to completion with ``--json``; its stdout parsed. Fails on a nonzero
        exit unless ``check=False``, and after ``timeout`` seconds (120)."""
        check: bool = options.pop("check", True)
        timeout: float = options.pop("timeout", 120)
        env: dict[str, str] = options
        if "--json" not in args:
            args = (*args, "--json")
        proc = await asyncio.create_subprocess_exec(
            REFSTREAM,
            *args,
            env=env_for(self.settings, **env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if check and proc.returncode != 0:
            raise CliError(f"refstream {' '.join(args)} exited {proc.returncode}: {err.decode()[-3000:]}")
        return orjson.loads(out) if out.strip() else None

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.logdir.glob("*.log")))

    def stop_all(self) -> None:
        for p in self.running:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.running:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
