"""The closed-loop load generator: Debian's ``wrk``, driven by a generated Lua script.

Each script holds a fixed set of pre-formatted requests (path, headers, body) that wrk's
``request()`` hands out round-robin, so the per-request Lua cost is one table lookup.
wrk's own CPU time is taken from the kernel's accounting of the child (``wait4`` rusage,
the same utime + stime that ``/proc/<pid>/stat`` shows over the run).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    body: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors
    wrk_cpu: float  # cores wrk used over the run (CPU seconds / wall seconds)
    server_cpu: float  # cores the measured server process used over the run


def _long(s: str) -> str:
    level = 1
    while f"]{'=' * level}]" in s:
        level += 1
    eq = "=" * level
    return f"[{eq}[{s}]{eq}]"


def lua_script(requests: Sequence[Request], *, per_request: bool = False, unique: str | None = None) -> str:
    """A wrk script that sends ``requests`` round-robin (POST). With ``per_request`` each
    request is formatted when sent (a fair baseline for ``unique``); with ``unique`` (a
    header name) each also carries that header, valued ``<random>-<n>``: never sent twice."""
    if per_request or unique is not None:
        return _lua_per_request(requests, unique)
    lines = ["local reqs = {}", "local i = 0", "init = function(args)"]
    for r in requests:
        hdrs = ", ".join(f"[ {_long(k)} ] = {_long(v)}" for k, v in r.headers.items())
        lines.append(f"  reqs[#reqs + 1] = wrk.format('POST', {_long(r.path)}, {{{hdrs}}}, {_long(r.body)})")
    lines += ["end", "request = function()", "  i = i % #reqs + 1", "  return reqs[i]", "end", ""]
    return "\n".join(lines)


def _lua_per_request(requests: Sequence[Request], unique: str | None) -> str:
    lines = [
        "local reqs = {}",
        "local i, n = 0, 0",
        f"local name = {_long(unique or '')}",
        f"local run = {_long(os.urandom(8).hex())}",
        "init = function(args)",
    ]
    for r in requests:
        hdrs = ", ".join(f"[ {_long(k)} ] = {_long(v)}" for k, v in r.headers.items())
        lines.append(f"  reqs[#reqs + 1] = {{ {_long(r.path)}, {{{hdrs}}}, {_long(r.body)} }}")
    lines += [
        "end",
        "request = function()",
        "  i = i % #reqs + 1",
        "  n = n + 1",
        "  local r, h = reqs[i], {}",
        "  for k, v in pairs(r[2]) do h[k] = v end",
        "  if name ~= '' then h[name] = run .. '-' .. n end",
        "  return wrk.format('POST', r[1], h, r[3])",
        "end",
        "",
    ]
    return "\n".join(lines)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unreadable latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(out: str) -> tuple[float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, requests, errors) from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return rps, p50, p99, total, errors


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process and its live descendants (a pre-forked server's
    children), from /proc/<pid>/stat (0.0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / _TICKS
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return own + sum(proc_cpu_seconds(int(c)) for c in children)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(
    url: str,
    requests: Sequence[Request],
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    server_pid: int | None = None,
    timeout_s: int = 10,
    per_request: bool = False,
    unique: str | None = None,
) -> WrkResult:
    """One wrk run against ``url`` (scheme://host:port); blocks for ``duration`` seconds."""
    with tempfile.TemporaryDirectory(prefix="refstream-wrk-") as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(lua_script(requests, per_request=per_request, unique=unique))
        out_path = Path(tmp) / "out.txt"
        secs = max(1, round(duration))
        with open(out_path, "wb") as out:
            cpu0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
            start = time.monotonic()
            proc = subprocess.Popen(
                [
                    "wrk",
                    "-t",
                    str(threads),
                    "-c",
                    str(connections),
                    "-d",
                    f"{secs}s",
                    "--timeout",
                    f"{timeout_s}s",
                    "--latency",
                    "-s",
                    str(script),
                    url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - start
            cpu1 = proc_cpu_seconds(server_pid) if server_pid else 0.0
        text = out_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {text[-2000:]}")
    rps, p50, p99, total, errors = parse(text)
    return WrkResult(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        requests=total,
        errors=errors,
        wrk_cpu=(usage.ru_utime + usage.ru_stime) / wall,
        server_cpu=(cpu1 - cpu0) / wall,
    )
