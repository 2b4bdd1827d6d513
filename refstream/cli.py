"""``refstream``: one command line for the edge, the workers and their operators.

Settings are built here, once, from the environment, and passed down. Commands that print
data print JSON on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import click
import orjson
import uvloop
from pydantic import ValidationError

from ingest import admin, flags, schema_check
from ingest.connections import REDIS_ERRORS, Redis, connect_redis
from ingest.db import ensure_database
from ingest.db import migrate as apply_schema
from ingest.keys import Keys
from ingest.logs import configure_logging
from ingest.settings import Settings

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None


def _print(data: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def _run(fn: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    settings = _settings()
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        return uvloop.run(fn(settings))
    except admin.NotFound as exc:
        raise click.ClickException(str(exc)) from None
    except (*REDIS_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@asynccontextmanager
async def _connections(settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, Redis]]:
    conn = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings)
    try:
        yield conn, redis
    finally:
        await asyncio.shield(conn.close())
        await redis.aclose()


@click.group()
def main() -> None:
    """refstream: referral and affiliate event ingestion (edge → Redis Streams → workers → Postgres)."""


async def _check_database(settings: Settings, *, wait: bool) -> None:
    """The startup check of ``serve`` and ``work``: the database is there and migrated to
    ``SCHEMA_VERSION``, else one line naming server, database, what is wrong and what to
    run, and a non-zero exit (``ingest.schema_check`` sorts the cases).

    Postgres being unreachable is an outage, not a mistake, so neither command refuses to
    start over it: ``work`` (``--drain`` too) waits for it, logging once per change of
    state, as its loop waits out outages mid-run; ``serve`` logs it once and starts, since
    its public routes accept into Redis (or the spool) without Postgres, and ``/readyz``
    answers 503 with the reason until Postgres answers. A database that answers but is
    missing, refuses our credentials or is not migrated is refused at once: waiting would
    not fix it, and a worker writing into the wrong schema would dead-letter good events.
    """
    status = await schema_check.at_startup(settings.database_url, wait=wait)
    if not status.ok and not status.transient:
        raise click.ClickException(status.line(settings.database_url))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the HTTP edge.

    Refuses to start on a database that is missing or not migrated; starts while Postgres
    is unreachable (/readyz answers 503 with the reason until it answers)."""
    from aiohttp import web

    from ingest.app import create_app

    settings = _settings()
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms)
    uvloop.run(_check_database(settings, wait=False))
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        access_log=None,  # the app logs one canonical line per request itself
        print=lambda msg: click.echo(msg, err=True),
        loop=uvloop.new_event_loop(),
    )


@main.command()
@click.option("--drain", is_flag=True, help="Process until every stream is read and acked, then exit.")
def work(drain: bool) -> None:
    """Run a worker (arq): consume the event streams into Postgres.

    Waits for an unreachable Postgres; refuses a database that is missing or not migrated."""
    from workers.worker import build_worker
    from workers.worker import drain as drain_streams

    if drain:

        async def checked_drain(settings: Settings) -> dict[str, int]:
            await _check_database(settings, wait=True)
            return await drain_streams(settings)

        _print(_run(checked_drain))
        return
    settings = _settings()
    configure_logging(settings.log_level, json=settings.log_json, flush_ms=settings.log_flush_ms)
    uvloop.run(_check_database(settings, wait=True))
    asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(settings).run()


@main.command()
def migrate() -> None:
    """Apply schema.sql (idempotent; creates the database if it is missing)."""

    async def go(settings: Settings) -> dict[str, Any]:
        created = await ensure_database(settings.database_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await apply_schema(conn)
        finally:
            await conn.close()
        return {"migrated": True, "database_created": created}

    _print(_run(go))


@main.group()
def workspace() -> None:
    """Workspaces."""


@workspace.command("create")
@click.argument("name")
def workspace_create(name: str) -> None:
    """Create a workspace and its first API key (scope *); the key is shown once."""

    async def go(settings: Settings) -> dict[str, str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await admin.create_workspace(conn, name)
        finally:
            await conn.close()

    _print(_run(go))


@main.group()
def link() -> None:
    """Referral links."""


@link.command("create")
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
        async with _connections(settings) as (conn, redis):
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

    _print(_run(go))


@link.command("show")
@click.argument("code")
def link_show(code: str) -> None:
    """A link with its counters."""

    async def go(settings: Settings) -> dict[str, Any]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await admin.show_link(conn, code)
        finally:
            await conn.close()

    _print(_run(go))


@main.group()
def keys() -> None:
    """API keys: created (shown once) and revoked."""


@keys.command("create")
@click.option("--workspace", "workspace_id", required=True)
@click.option("--scopes", default="*", show_default=True, help="Comma-separated: read, write, track, *.")
@click.option("--affiliate", "affiliate_id", default=None, help="A read-only key for this affiliate only.")
@click.option("--name", default=None)
def keys_create(workspace_id: str, scopes: str, affiliate_id: str | None, name: str | None) -> None:
    """Create a key; prints {"api_key": ...} once: only its sha256 is stored."""

    async def go(settings: Settings) -> dict[str, Any]:
        async with _connections(settings) as (conn, redis):
            return await admin.create_key(
                conn,
                redis,
                Keys(settings.stream_prefix, settings.partitions),
                workspace_id=workspace_id,
                scopes=[s.strip() for s in scopes.split(",") if s.strip()],
                affiliate_id=affiliate_id,
                name=name,
            )

    try:
        _print(_run(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its display prefix; every edge refuses it within seconds."""

    async def go(settings: Settings) -> dict[str, Any]:
        async with _connections(settings) as (conn, redis):
            return await admin.revoke_key(conn, redis, Keys(settings.stream_prefix, settings.partitions), prefix)

    _print(_run(go))


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
        _print(_run(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@feature.command("disable")
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_disable(name: str) -> None:
    """Turn a feature off (its routes answer 503)."""
    _feature(name, False)


@feature.command("enable")
@click.argument("name", type=click.Choice(flags.FEATURES))
def feature_enable(name: str) -> None:
    """Turn a feature back on."""
    _feature(name, True)


@main.command()
@click.option("--port", default=8000, show_default=True, type=int)
def dev(port: int) -> None:
    """Everything on one machine: embedded servers if none answer, migrate, demo data,
    the edge and one worker."""
    from .dev import run_dev

    run_dev(port)


# operator commands live in their own modules and are registered here
from . import ops_replay  # noqa: E402

main.add_command(ops_replay.replay)
main.add_command(ops_replay.reconcile)
from . import ops_status  # noqa: E402

main.add_command(ops_status.status)
main.add_command(ops_status.dead)

from .bench import bench  # noqa: E402

main.add_command(bench)


if __name__ == "__main__":
    main()
