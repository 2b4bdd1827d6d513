"""What aiohttp's application layer costs beside its low-level server: the same hello-world
POST served through ``web.Application`` (router, middleware chain, as ``bench.apps hello``)
and through ``web.Server`` (one handler: the same parser, ``web.Response`` and writer), each
with and without the edge's answer headers (rate limit, CORS, request id).
``python -m bench.aiohttp_layers [--rounds 3] [--duration 8]``.

Each server is its own process on uvloop, loaded by wrk (``-t1 -c32``, 2 s of warm-up, then
``--duration`` seconds); its CPU per request comes from ``/proc``. The forms run in turn,
``--rounds`` times; the medians are printed, and each form's ratio to the application's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

import uvloop
from aiohttp import web

from .apps import HELLO

FORMS = ("application", "server", "application+headers", "server+headers")
# what the edge's answer to a click carries beside hello-world's (ingest.host.cors, the rate limit)
HEADERS = {
    "X-RateLimit-Limit": "1000000000",
    "X-RateLimit-Remaining": "999999999",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After",
    "X-Request-ID": "0123456789abcdef0123456789abcdef",
}
PATH = "/api/v1/referral/click/abc"


def serve(form: str, port: int) -> None:
    headers = HEADERS if form.endswith("+headers") else None

    async def hello(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=HELLO, content_type="application/json", headers=headers)

    async def main() -> None:
        runner: web.BaseRunner
        if form.startswith("application"):
            app = web.Application()
            app.router.add_post("/api/v1/referral/click/{code}", hello)
            runner = web.AppRunner(app, access_log=None)
        else:
            handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] = hello
            runner = web.ServerRunner(web.Server(handler, access_log=None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wrk(port: int, seconds: float, script: Path) -> int:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script), f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(next(line for line in out.splitlines() if "requests in" in line).split()[0])


def _ready(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def measure(form: str, seconds: float, script: Path) -> tuple[float, float]:
    """(requests a second, µs of the server's CPU a request)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.aiohttp_layers", "--serve", form, "--port", str(port)])
    try:
        _ready(port)
        _wrk(port, 2, script)
        cpu0 = _cpu_s(proc.pid)
        done = _wrk(port, seconds, script)
        cpu1 = _cpu_s(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    return done / seconds, (cpu1 - cpu0) / done * 1e6


def main(rounds: int, seconds: float) -> None:
    script = Path(f"/tmp/refstream-aiohttp-layers-{os.getpid()}.lua")
    script.write_text('wrk.method = "POST"\nwrk.body = ""\n')
    got: dict[str, list[tuple[float, float]]] = {f: [] for f in FORMS}
    try:
        for _ in range(rounds):
            for form in FORMS:
                got[form].append(measure(form, seconds, script))
    finally:
        script.unlink(missing_ok=True)
    base = median(us for _, us in got["application"])
    print(f"hello-world POST, one process, wrk -t1 -c32, {seconds:g} s; medians of {rounds}:")
    print(f"{'form':>22} {'req/s':>8} {'µs CPU a request':>17} {'÷ application':>14}")
    for form in FORMS:
        us = median(u for _, u in got[form])
        rps = median(r for r, _ in got[form])
        spread = ", ".join(f"{u:.1f}" for _, u in got[form])
        print(f"{form:>22} {rps:>8,.0f} {us:>8.1f} ({spread}) {us / base:>8.2f}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--serve", choices=FORMS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
    else:
        main(args.rounds, args.duration)


if __name__ == "__main__":
    cli()
