"""``refstream``: one command line for the edge, the workers and their operators.

Settings are built here, once, from the environment, and passed down. Commands that print
data print JSON on stdout; diagnostics go to stderr.

Every failure is one line on stderr, ``Error: <what is wrong>; <what to do>``, and a
non-zero exit: a setting under the environment variable that sets it, a Redis or Postgres
under its ``host:port/db`` (never its password), a database that is missing or behind
with the command that fixes it (``ingest.manage.schema_check`` words those). ``--debug`` (or
``REFSTREAM_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import socket
from typing import Any

import asyncpg
import click
import structlog
import uvloop
from click.core import ParameterSource

from ingest.contract.connections import REDIS_ERRORS, connect_redis
from ingest.contract.keys import Keys
from ingest.contract.logs import configure_logging
from ingest.contract.settings import Settings
from ingest.edge import apikeys, flags
from ingest.link import durability
from ingest.manage import admin, schema_check
from ingest.manage.db import ensure_database
from ingest.manage.db import migrate as apply_schema
from workers.consumer import partitions

from . import __version__, services
from . import ops_output as out
from .runner import RefstreamGroup, load_settings, open_connections, open_database, print_data, run_command

log = structlog.get_logger("refstream.cli")


@click.group(cls=RefstreamGroup)
@click.option(
    "--debug", is_flag=True, envvar="REFSTREAM_DEBUG", help="Show the traceback of an error. [env: REFSTREAM_DEBUG]"
)
@click.version_option(__version__, prog_name="refstream")
def main(debug: bool) -> None:
    """refstream: referral and affiliate event ingestion (edge → Redis Streams → workers → Postgres)."""


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
        async with asyncio.timeout(settings.redis_socket_timeout):
            problem = await durability.startup_problem(redis, settings)
    except (*REDIS_ERRORS, TimeoutError) as exc:
        log.warning("durability.unchecked", reason=repr(exc))
        return
    finally:
        await redis.aclose()
    if problem is not None:
        raise click.ClickException(problem)


def _listen_check(host: str, port: int, command: str) -> None:
    """Fail in one line, before anything starts, when ``host:port`` cannot be listened on:
    a second ``dev`` must not take the first one's answers for its own."""
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
                raise click.ClickException(_listen_error(host, port, command, exc)) from None


def _listen_error(host: str, port: int, command: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another refstream {command}?): stop it, or choose"
            f" another port: refstream {command} --port N"
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


@main.command()
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
        _listen_check(host, port, "serve")
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
        raise click.ClickException(_listen_error(host, port, "serve", exc)) from exc


@main.command()
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


@main.command()
@out.json_option
def migrate() -> None:
    """Apply schema.sql (idempotent; creates the database if it is missing)."""

    async def go(settings: Settings) -> dict[str, Any]:
        status = await schema_check.check_url(settings.database_url)
        if status.kind not in (schema_check.Kind.OK, schema_check.Kind.NO_DATABASE, schema_check.Kind.NOT_MIGRATED):
            raise click.ClickException(status.line(settings.database_url))
        created = await ensure_database(settings.database_url)
        conn = await asyncpg.connect(settings.database_url, timeout=schema_check.CONNECT_TIMEOUT_S)
        try:
            await apply_schema(conn)
            # the days around today get their partitions now, before any batch inserts
            await partitions.maintain(
                conn, retention_days=settings.event_retention, dedupe_days=settings.dedupe_retention,
                skew_max_s=settings.clock_skew_max_s, webhook_days=settings.webhook_retention,
            )  # fmt: skip
        finally:
            await conn.close()
        return {"migrated": True, "database_created": created}

    print_data(run_command(go))


@main.group()
def workspace() -> None:
    """Workspaces."""


@workspace.command("create")
@out.json_option
@click.argument("name")
def workspace_create(name: str) -> None:
    """Create a workspace and its first API key (scope *); the key is shown once."""

    async def go(settings: Settings) -> dict[str, str]:
        conn = await open_database(settings)
        try:
            return await admin.create_workspace(conn, name)
        finally:
            await conn.close()

    print_data(run_command(go))


@main.group()
def link() -> None:
    """Referral links."""


@link.command("create")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--code", required=True)
@click.option("--url", default=None, help="Destination; defaults to the program's URL.")
@click.option("--program", "program_id", default=None)
@click.option("--affiliate", "affiliate_id", default=None)
def link_create(
    workspace_id: str, code: str, url: str | None, program_id: str | None, affiliate_id: str | None
) -> None:
    """Create a link (a default program and affiliate when none are given)."""

    async def go(settings: Settings) -> dict[str, Any]:
        async with open_connections(settings) as (conn, redis):
            try:
                return await admin.create_link(
                    conn,
                    redis,
                    Keys(settings.stream_prefix, settings.partitions),
                    workspace_id=workspace_id,
                    code=code,
                    url=url,
                    program_id=program_id,
                    affiliate_id=affiliate_id,
                )
            except asyncpg.UniqueViolationError:
                raise click.ClickException(f"a link with code {code!r} exists already") from None
            except asyncpg.DataError as exc:
                raise click.ClickException(str(exc)) from None

    print_data(run_command(go))


@link.command("show")
@out.json_option
@click.argument("code")
def link_show(code: str) -> None:
    """A link with its counters; per day of the last 30, what counted, what was dropped
    and why (bot, unknown_code, rate_limited, ...), and what was flagged as fraud."""
    from .ops_links import show_link

    show_link(code)


@main.group()
def keys() -> None:
    """API keys: created (shown once) and revoked."""


_SCOPES_HELP = "read (stats, links, events), write (programs, affiliates, links, webhooks), track (events), * (all)"


@keys.command("create")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--scopes", default=None, help=f"Comma-separated, required for a workspace key: {_SCOPES_HELP}.")
@click.option("--affiliate", "affiliate_id", default=None, help="A read-only key for this affiliate only.")
@click.option("--name", default=None)
def keys_create(workspace_id: str, scopes: str | None, affiliate_id: str | None, name: str | None) -> None:
    """Create a key; prints {"api_key": ...} once: only its sha256 is stored."""
    wanted = [s.strip() for s in (scopes or "").split(",") if s.strip()]
    if not affiliate_id:
        # no default: a key gets the powers someone chose for it, and "*" is every power
        if not wanted:
            raise click.ClickException(f"keys create needs --scopes, comma-separated, of: {_SCOPES_HELP}")
        unknown = [s for s in wanted if s not in apikeys.SCOPES]
        if unknown:
            raise click.ClickException(f"unknown scope {', '.join(map(repr, unknown))}; --scopes takes: {_SCOPES_HELP}")

    async def go(settings: Settings) -> dict[str, Any]:
        async with open_connections(settings) as (conn, redis):
            return await admin.create_key(
                conn,
                redis,
                Keys(settings.stream_prefix, settings.partitions),
                workspace_id=workspace_id,
                scopes=wanted,
                affiliate_id=affiliate_id,
                name=name,
            )

    try:
        print_data(run_command(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("revoke")
@out.json_option
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its display prefix; every edge refuses it within seconds."""

    async def go(settings: Settings) -> dict[str, Any]:
        async with open_connections(settings) as (conn, redis):
            return await admin.revoke_key(conn, redis, Keys(settings.stream_prefix, settings.partitions), prefix)

    print_data(run_command(go))


@main.group()
def feature() -> None:
    """Kill switches."""


def _feature(name: str, enabled: bool) -> None:
    async def go(settings: Settings) -> dict[str, Any]:
        redis = connect_redis(settings)
        try:
            await flags.set_enabled(redis, Keys(settings.stream_prefix, settings.partitions), name, enabled)
        finally:
            await redis.aclose()
        return {"feature": name, "enabled": enabled}

    try:
        print_data(run_command(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@feature.command("disable")
@out.json_option
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_disable(name: str) -> None:
    """Turn a feature off (its routes answer 503)."""
    _feature(name, False)


@feature.command("enable")
@out.json_option
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_enable(name: str) -> None:
    """Turn a feature back on."""
    _feature(name, True)


@main.command("secret-key")
def secret_key() -> None:
    """Print a new key for REFSTREAM_SECRET_KEY (Fernet), which encrypts webhook signing
    secrets at rest. To rotate: put the new key first, keep the old one after a comma."""
    from ingest.ledger import secretbox

    click.echo(secretbox.generate_key())


@main.command()
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--data",
    "data_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Keep the embedded servers' data, the demo API key and the secret key here, across runs.",
)
def dev(port: int, data_dir: str | None) -> None:
    """Everything on one machine: embedded servers if none answer (or the default ones
    refuse us), migrate, demo data, the edge and one worker."""
    from .dev import run_dev

    settings = load_settings()  # a bad setting is named before anything starts
    edge_processes(os.environ.get("REFSTREAM_PROCESSES"))
    # dev's own lines as its children write theirs: JSON on stderr (stdout is the banner)
    configure_logging(settings.log_level, json=settings.log_json)
    _listen_check("127.0.0.1", port, "dev")
    run_dev(port, data_dir)


# operator commands live in their own modules and are registered here
from . import ops_reconcile, ops_replay  # noqa: E402

main.add_command(ops_replay.replay)
main.add_command(ops_reconcile.reconcile)
from . import ops_status  # noqa: E402
from .ops_archive import archive  # noqa: E402

main.add_command(archive)

main.add_command(ops_status.status)
main.add_command(ops_status.dead)
from . import ops_commissions, ops_partitions  # noqa: E402

main.add_command(ops_partitions.partitions)
main.add_command(ops_commissions.commission)
main.add_command(ops_commissions.payouts)
from . import ops_erase, ops_workspace  # noqa: E402

main.add_command(ops_erase.erase)
from .ops_import import import_  # noqa: E402

main.add_command(import_)

workspace.add_command(ops_workspace.set_bot_policy)
workspace.add_command(ops_workspace.set_fraud_policy)
workspace.add_command(ops_workspace.delete)

if importlib.util.find_spec("bench") is not None:  # the source tree's bench/, beside ingest/ and workers/
    from bench import bench

    main.add_command(bench)
else:

    @main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def bench() -> None:
        """The benchmark (it ships with the source tree, not the package)."""
        raise click.ClickException(
            "the benchmark ships with refstream's source tree, not its package: run ./scripts/bench in a checkout"
        )


if __name__ == "__main__":
    main(prog_name="refstream")  # dev's children run as `python -m refstream.cli`
