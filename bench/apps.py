"""The two reference servers the edge is measured against, run as their own process
(``python -m bench.apps hello|naive --port P``) with the edge's event loop
(uvloop) and process count (one; ``hello --processes N``: N processes on the port with
``SO_REUSEPORT``, as ``refstream serve --processes N``):

- ``hello``: a bare aiohttp POST handler answering a constant JSON body, the ceiling of
  any aiohttp edge on this machine;
- ``naive``: the synchronous design refstream replaces, one ``UPDATE links SET clicks =
  clicks + 1`` per click, committed before the answer, all on one hot link, through an
  asyncpg pool of ``--pool-size`` connections (10, asyncpg's default).

  Written as a developer would write it with asyncpg's pool (``async with pool.acquire()``),
  each click costs two round trips to Postgres: the UPDATE (autocommit, its prepared
  statement cached) and the reset query asyncpg's pool runs when a connection comes back
  (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``). Other stacks
  don't all pay the second one (psycopg's pool checks the transaction state locally), so
  ``--no-reset`` drops it: one round trip per click, the fastest this design gets. Both
  are measured through the latency proxy; locally the difference is small.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import AsyncIterator, Callable

import asyncpg
import uvloop
from aiohttp import web

HELLO = b'{"success":true,"data":{"tracked":true}}'
POOL = web.AppKey("pool", asyncpg.Pool)
_UPDATE = "UPDATE links SET clicks = clicks + 1 WHERE code = $1"


async def _health(request: web.Request) -> web.Response:
    return web.Response(body=b"ok")


async def _hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=HELLO, content_type="application/json")


async def _naive(request: web.Request) -> web.Response:
    await request.read()
    async with request.app[POOL].acquire() as conn:
        await conn.execute(_UPDATE, request.match_info["code"])
    return web.Response(body=HELLO, content_type="application/json")


def hello_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", _health)
    app.router.add_post("/api/v1/referral/click/{code}", _hello)
    return app


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the handler leaves no transaction, cursor, listener or setting."""


def naive_app(dsn: str, pool_size: int, reset: bool = True) -> web.Application:
    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(
            dsn, min_size=pool_size, max_size=pool_size, reset=None if reset else _no_reset
        )
        yield
        await app[POOL].close()

    app = web.Application()
    app.cleanup_ctx.append(pool)
    app.router.add_get("/healthz", _health)
    app.router.add_post("/api/v1/referral/click/{code}", _naive)
    return app


def _processes(n: int, serve: Callable[[], None]) -> None:
    """``serve`` in ``n`` forked processes (each binds the port with SO_REUSEPORT); this
    one forwards SIGTERM/SIGINT to them and returns once they have all exited."""
    from refstream.embedded import die_with_parent

    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            die_with_parent(signal.SIGTERM)
            try:
                serve()
            finally:
                os._exit(0)
        pids.append(pid)

    def forward(sig: int, frame: object) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in pids:
        os.waitpid(p, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app", choices=["hello", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", default="")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1, help="hello only: processes sharing the port")
    parser.add_argument("--no-reset", action="store_true", help="naive: no reset query when a connection is released")
    args = parser.parse_args()
    if args.app == "hello" and args.processes > 1:

        def serve() -> None:
            web.run_app(
                hello_app(),
                host="127.0.0.1",
                port=args.port,
                access_log=None,
                print=None,
                reuse_port=True,
                loop=uvloop.new_event_loop(),
            )

        _processes(args.processes, serve)
        return
    app = hello_app() if args.app == "hello" else naive_app(args.dsn, args.pool_size, reset=not args.no_reset)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
