"""What aiohttp's application layer costs beside its low-level server: the same hello-world
POST served through ``web.Application`` (router, middleware chain, as ``bench.apps hello``)
and through ``web.Server`` (one handler: the same parser, ``web.Response`` and writer), each
with and without the edge's answer headers (rate limit, CORS, request id).
``python -m bench.aiohttp_layers [--rounds 3] [--duration 8]``.

Each server is its own process on uvloop, loaded by wrk (``bench.wrk``: one thread, 32 connections, 2 s of warm-up, then
``--duration`` seconds); its CPU per request comes from ``/proc``. The forms run in turn,
``--rounds`` times; the medians are printed, and each form's ratio to the application's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from statistics import median

import uvloop
from aiohttp import web

from refstream.embedded import free_port

from . import wrk
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


def _ready(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def measure(form: str, seconds: float) -> tuple[float, float]:
    """(requests a second, µs of the server's CPU a request)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.aiohttp_layers", "--serve", form, "--port", str(port)])
    url, requests = f"http://127.0.0.1:{port}", [wrk.Request(PATH, "", {})]
    try:
        _ready(port)
        wrk.run(url, requests, duration=2, connections=32)  # warm-up
        got = wrk.run(url, requests, duration=seconds, connections=32, server_pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    return got.rps, got.server_cpu / got.rps * 1e6


def main(rounds: int, seconds: float) -> None:
    got: dict[str, list[tuple[float, float]]] = {f: [] for f in FORMS}
    for _ in range(rounds):
        for form in FORMS:
            got[form].append(measure(form, seconds))
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
