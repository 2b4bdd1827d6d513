"""``refstream serve``, ``refstream work`` and ``refstream dev``: the long-running
processes, each checked before it starts (a database missing or behind, a Redis that can
never give the configured durability, a port already taken) so that it fails in one line
rather than after it has begun serving.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import click
import structlog
import uvloop
from click.core import ParameterSource

from ingest.contract.connections import REDIS_ERRORS, connect_redis
from ingest.contract.logs import configure_logging
from ingest.contract.settings import Settings
from ingest.link import durability
from ingest.manage import schema_check
from refstream import output as out
from refstream import services
from refstream.runner import load_settings, print_data, run_command

log = structlog.get_logger("refstream.cli")


async def _check_database(settings: Settings, *, wait: bool) -> None:
    """The startup check of ``serve`` and ``work``: the database is there and migrated to
    ``SCHEMA_VERSION``, else one line naming server, database, what is wrong and what to
    run, and a non-zero exit (``ingest.manage.schema_check`` sorts the cases).

    Postgres being unreachable is an outage, not a mistake, so neither command refuses to
    start over it: ``work`` waits for it, logging once per change of state, as its loop
    waits out outages mid-run; ``serve`` logs it once and starts, since its public routes
    accept into Redis (or the spool) without Postgres, and ``/readyz`` answers 503 with the
    reason until Postgres answers. A database that answers but is missing, refuses our
    credentials or is not migrated is refused at once: waiting would not fix it, and a
    worker writing into the wrong schema would dead-letter good events.
    """
    status = await schema_check.at_startup(settings.database_url, wait=wait)
    if not status.ok and not status.transient:
        raise click.ClickException(status.line(settings.database_url))


async def _check_durability(settings: Settings) -> None:
    """The other startup check of ``serve`` and ``work``: a Redis that can never give the
    configured ``REFSTREAM_ACK_DURABILITY`` (``fsync`` on a Redis older than 7.2, or without
    its AOF) is refused in one line. A Redis that does not answer is not: until it does,
    nothing is confirmed at that level, and the edge spools or answers 503."""
    if not settings.ack_fsync:
        return
    redis = connect_redis(settings)
    try:
        async with asyncio.timeout(settings.redis_socket_timeout_s):
            problem = await durability.startup_problem(redis, settings)
    except (*REDIS_ERRORS, TimeoutError) as exc:
        log.warning("durability.unchecked", reason=exc)
        return
    finally:
        await redis.aclose()
    if problem is not None:
        raise click.ClickException(problem)


def listen_check(host: str, port: int, command: str, option: str = "--port") -> None:
    """Fail in one line, before anything starts, when ``host:port`` cannot be listened on:
    a second ``dev`` must not take the first one's answers for its own. The line names
    ``option``, the one that moves this port (dev's console: ``--console-port``)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as exc:
                raise click.ClickException(_listen_error(host, port, command, option, exc)) from None


def _listen_error(host: str, port: int, command: str, option: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another refstream {command}?): stop it, or choose"
            f" another port: refstream {command} {option} N"
        )
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def edge_processes(value: str | None, *, source: str = "REFSTREAM_PROCESSES") -> int | None:
    """A count of edge processes as given (None: not given); a bad one is an error that
    names where it came from and the form it takes."""
    if value is None or not value.strip():
        return None
    n = int(value) if value.strip().isdigit() else 0
    if n < 1:
        raise click.ClickException(f"{source}: a whole number of edge processes, 1 or more (got {value!r})")
    return n


def _processes(ctx: click.Context, value: str | None) -> int | None:
    if ctx.get_parameter_source("processes") is ParameterSource.ENVIRONMENT:
        return edge_processes(value)  # not a usage error: the environment holds it
    try:
        return edge_processes(value, source="--processes")
    except click.ClickException as exc:
        raise click.BadParameter(exc.message.removeprefix("--processes: ")) from None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--processes",
    default=None,
    metavar="N",
    envvar="REFSTREAM_PROCESSES",
    callback=lambda ctx, param, value: _processes(ctx, value),
    help="Edge processes sharing the port (SO_REUSEPORT), under a supervisor that replaces a dead one,"
    " reloads on SIGHUP and drains on SIGTERM; 1 runs the edge alone. [default: the CPU count;"
    " env: REFSTREAM_PROCESSES]",
)
@click.option(
    "--take-over",
    is_flag=True,
    help="Take the listening sockets of the refstream serve running on this host and port (2 or more"
    " processes), serve on them, then let it drain: a rolling restart of the supervisor itself, with no"
    " connection reset. Runs one process per socket taken.",
)
def serve(host: str, port: int, processes: int | None, take_over: bool) -> None:
    """Run the HTTP edge.

    Refuses to start on a database that is missing or not migrated; starts while Postgres
    is unreachable (/readyz answers 503 with the reason until it answers)."""
    from ingest.host import prefork, server, takeover

    settings = load_settings()
    n = processes or prefork.cpu_count()
    if not take_over:
        listen_check(host, port, "serve")
    # the supervisor logs a few lines: unbuffered (its children buffer their own)
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms if n == 1 else 0)
    uvloop.run(_check_database(settings, wait=False))
    uvloop.run(_check_durability(settings))
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        if n == 1 and not take_over:
            # the runner carries the timeouts and limits of REFSTREAM_*_TIMEOUT_S and
            # REFSTREAM_MAX_HEADER_BYTES, and the guard that closes connections sending no request
            uvloop.run(server.serve(settings, host, port, print=say))
            return
        supervisor = prefork.Supervisor(host, port, n, print=say, take_over=take_over)
        if supervisor.run() != 0:
            raise click.ClickException(supervisor.failed or "the edge processes failed")
    except takeover.NothingToTakeOver as exc:
        raise click.ClickException(
            f"{exc}: --take-over needs a refstream serve of 2 or more processes running on {host}:{port}"
        ) from exc
    except OSError as exc:  # taken since the check: a race
        if exc.errno != errno.EADDRINUSE:
            raise
        raise click.ClickException(_listen_error(host, port, "serve", "--port", exc)) from exc


@click.command()
@out.json_option
@click.option("--drain", is_flag=True, help="Process until every stream is read and acked, then exit.")
def work(drain: bool) -> None:
    """Run a worker (arq): consume the event streams into Postgres.

    Waits for an unreachable Postgres (``--drain``: at most REFSTREAM_CONNECT_TIMEOUT_S,
    Redis too); refuses a database that is missing or not migrated."""
    from workers.host.worker import build_worker
    from workers.host.worker import drain as drain_streams

    if drain:

        async def checked_drain(settings: Settings) -> dict[str, int]:
            await services.wait_for_redis(settings)
            await _check_durability(settings)
            await services.wait_for_postgres(settings)
            return await drain_streams(settings)

        print_data(run_command(checked_drain))
        return
    settings = load_settings()
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms)
    uvloop.run(_check_database(settings, wait=True))
    uvloop.run(_check_durability(settings))
    asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(settings).run()


@click.command()
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--data",
    "data_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Keep the embedded servers' data, the demo API key and the secret key here, across runs.",
)
@click.option("--console-port", default=None, type=int, help="The console's port. [default: --port + 10]")
def dev(port: int, data_dir: str | None, console_port: int | None) -> None:
    """Everything on one machine: embedded servers if none answer (or the default ones
    refuse us), migrate, demo data, the edge, one worker, an archiver and the console."""
    from refstream.dev import run_dev

    settings = load_settings()  # a bad setting is named before anything starts
    edge_processes(os.environ.get("REFSTREAM_PROCESSES"))
    # dev's own lines as its children write theirs: JSON on stderr (stdout is the banner)
    configure_logging(settings.log_level, json=settings.log_json)
    listen_check("127.0.0.1", port, "dev")
    listen_check("127.0.0.1", console_port or port + 10, "dev", "--console-port")
    run_dev(port, data_dir, console_port)
