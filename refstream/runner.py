"""How a ``refstream`` command runs: its settings, built once; its Postgres and Redis; its
output (JSON); and its failures, each worded in one line (``Error: <what is wrong>; <what
to do>``), with the traceback only under ``--debug``. Shared by ``refstream.cli``'s group
and the commands in ``refstream.commands``.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import click
import orjson
import uvloop
from pydantic import ValidationError

from ingest.contract import clock
from ingest.contract import settings as settings_mod
from ingest.contract.connections import REDIS_ERRORS, Redis, connect_redis
from ingest.contract.errors import NotFound
from ingest.contract.logs import configure_logging
from ingest.contract.settings import Settings
from ingest.ledger import directory as directory_mod
from ingest.ledger import placement
from ingest.manage import schema_check

from . import services
from .embedded import EmbeddedError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_SETTINGS = "refstream.settings"  # in click's ctx.meta: the settings the command runs with


def load_settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        raise click.ClickException(settings_mod.explain(exc)) from None
    clock.configure(settings.clock_offset_s)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_SETTINGS] = settings
    return settings


def _explain(exc: BaseException) -> str | None:
    """The one line for an error a command let through, or None when it is not one we know
    (a bug: the caller says so)."""
    if isinstance(exc, ValidationError):
        return settings_mod.explain(exc)
    if isinstance(exc, NotFound | services.ServiceError | EmbeddedError):
        return str(exc)
    ctx = click.get_current_context(silent=True)
    settings: Settings | None = ctx.meta.get(_SETTINGS) if ctx is not None else None
    if settings is None:
        return None
    return services.explain(exc, redis_url=settings.redis_url, database_url=settings.database_url)


def print_data(data: Any) -> None:
    """The command's data: a table for people, or JSON with ``--json``."""
    from .output import cell, console, print_json, table, wants_json

    if wants_json():
        print_json(data)
        return
    ctx = click.get_current_context(silent=True)

    rows = data if isinstance(data, list) else [data]
    t = table(ctx.command_path if ctx is not None else "refstream", "field", "value", left=("field", "value"))
    for i, row in enumerate(rows):
        if i:
            t.add_section()
        for key, value in row.items() if isinstance(row, dict) else [("value", row)]:
            shown = orjson.dumps(value).decode() if isinstance(value, dict | list | bool) or value is None else value
            t.add_row(cell(key), cell(shown))
    console().print(t)


def run_command(fn: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    settings = load_settings()
    configure_logging(settings.log_level, json=settings.log_json)
    try:
        return uvloop.run(fn(settings))
    except (*REDIS_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, NotFound) as exc:
        line = _explain(exc)
        if line is None:
            raise
        raise click.ClickException(line) from exc


def settings_and_logging() -> Settings:
    """The command's settings, with logging configured by them (``replay``, ``reconcile``:
    commands that run their own coroutines, see ``run_reading``).

    Their answer is what they print: the info line that the code they share with the
    workers logs at its end (a job's summary there) would only repeat it, after it. So they
    log warnings and errors; ``REFSTREAM_LOG_LEVEL=debug`` shows everything."""
    settings = load_settings()
    level = logging.getLevelName(settings.log_level.upper())
    quiet = not isinstance(level, int) or logging.DEBUG < level < logging.WARNING
    configure_logging("warning" if quiet else settings.log_level, json=settings.log_json)
    return settings


def run_reading(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` to its end, for a command that reads the archive and the database: what
    they raise becomes one line."""
    from workers.archive.segment import SegmentError
    from workers.archive.store import ArchiveUnavailable

    try:
        return uvloop.run(coro)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    except (ArchiveUnavailable, SegmentError) as exc:
        raise click.ClickException(f"the archive: {exc}") from None


async def open_database(settings: Settings, workspace_id: str | None = None) -> asyncpg.Connection:
    """A connection to a database that is there and migrated: the directory's
    (``DATABASE_URL``), or with ``workspace_id`` the shard that workspace is on
    (``ingest.ledger.placement``); else one line saying what is wrong (unreachable,
    refused, missing, behind) and what to do."""
    url = settings.database_url
    status = await schema_check.check_url(url)
    if not status.ok:
        raise click.ClickException(status.line(url))
    conn = await asyncpg.connect(url, timeout=schema_check.CONNECT_TIMEOUT_S)
    if workspace_id is None:
        return conn
    try:
        there = await directory_mod.shard_dsn_of(conn, workspace_id, settings.secret_key)
    except BaseException:
        await conn.close()
        raise
    if there is None:
        return conn
    await conn.close()
    status = await schema_check.check_url(there)
    if not status.ok:
        raise click.ClickException(f"the workspace's shard: {status.line(there)}")
    return await asyncpg.connect(there, timeout=schema_check.CONNECT_TIMEOUT_S)


async def open_holding(settings: Settings, sql: str, *args: Any) -> asyncpg.Connection:
    """A connection to the shard where ``sql`` (a yes-or-no question) says yes: for a
    command that names a row by an id unique across shards (a key's prefix, a link's code);
    the directory's when no shard holds it, whose answer is then "not found"."""
    conn = await open_database(settings)
    try:
        if await conn.fetchval(sql, *args):
            return conn
        shards = await directory_mod.shard_dsns(conn, settings.secret_key)
    except BaseException:
        await conn.close()
        raise
    for url in shards.values():
        there = await asyncpg.connect(url, timeout=schema_check.CONNECT_TIMEOUT_S)
        if await there.fetchval(sql, *args):
            await conn.close()
            return there
        await there.close()
    return conn


async def workspace_settings(settings: Settings, workspace_id: str) -> Settings:
    """``settings`` whose ``database_url`` is the shard ``workspace_id`` is on: for a
    command that opens its own pool for one workspace's work (an import, an erasure)."""
    return (await workspace_shard(settings, workspace_id))[1]


async def shard_urls(settings: Settings) -> dict[str, str]:
    """Every shard's DSN (its password put back) by name, ``default`` (``DATABASE_URL``)
    first: what a command that reads or checks everything runs on, a shard at a time. One
    entry while no shard was added."""
    conn = await open_database(settings)
    try:
        return {placement.DEFAULT: settings.database_url, **await directory_mod.shard_dsns(conn, settings.secret_key)}
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class Down:
    """A shard a command could not reach (or found missing or behind): said, not raised,
    so the other shards' figures are still shown."""

    shard: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "reachable": False, "error": self.error}


async def each_shard(settings: Settings, fn: Callable[[Settings], Awaitable[T]]) -> dict[str, T | Down]:
    """``fn`` on every shard in turn, by name, ``default`` first: given ``settings`` whose
    ``database_url`` is that shard's. With one shard, ``fn(settings)`` as before (its own
    errors raised). With several, a shard that cannot be reached is a ``Down``, and the
    others still run."""
    urls = await shard_urls(settings)
    if len(urls) == 1:
        return {placement.DEFAULT: await fn(settings)}
    done: dict[str, T | Down] = {}
    for name, url in urls.items():
        status = await schema_check.check_url(url)
        if not status.ok:
            done[name] = Down(name, status.line(url))
            continue
        done[name] = await fn(settings.model_copy(update={"database_url": url}))
    return done


def down_line(done: dict[str, Any]) -> str | None:
    """The one line naming every shard ``each_shard`` could not reach, or None."""
    down = [d for d in done.values() if isinstance(d, Down)]
    return "; ".join(f"shard {d.shard}: {d.error}" for d in down) or None


async def shards_of(settings: Settings, workspace_ids: list[str | None]) -> dict[str, str] | None:
    """The shard each of ``workspace_ids`` is on (``default`` for one the directory does not
    place), from the directory; None while there is one shard, or when the directory cannot
    be read (what asked goes on without it: a dead letter's listing)."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=schema_check.CONNECT_TIMEOUT_S)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return None
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM shards)"):
            return None
        rows = await conn.fetch(
            "SELECT workspace_id::text AS ws, shard FROM workspace_shards WHERE workspace_id::text = ANY($1::text[])",
            sorted({w for w in workspace_ids if w}),
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return None
    finally:
        await conn.close()
    placed = {r["ws"]: r["shard"] for r in rows}
    return {w: placed.get(w, placement.DEFAULT) for w in workspace_ids if w}


async def workspace_shard(settings: Settings, workspace_id: str) -> tuple[str, Settings]:
    """The name of the shard ``workspace_id`` is on, and ``workspace_settings``'s settings."""
    conn = await open_database(settings)
    try:
        try:
            ws: uuid.UUID | None = uuid.UUID(workspace_id)
        except ValueError:
            ws = None
        name = await conn.fetchval("SELECT shard FROM workspace_shards WHERE workspace_id = $1", ws) if ws else None
        there = await directory_mod.shard_dsn_of(conn, workspace_id, settings.secret_key)
    finally:
        await conn.close()
    if there is None:
        return placement.DEFAULT, settings
    return str(name), settings.model_copy(update={"database_url": there})


@asynccontextmanager
async def open_connections(
    settings: Settings, workspace_id: str | None = None
) -> AsyncIterator[tuple[asyncpg.Connection, Redis]]:
    """``open_database``'s connection (the workspace's shard's, with ``workspace_id``) and Redis."""
    conn = await open_database(settings, workspace_id)
    redis = connect_redis(settings)
    try:
        yield conn, redis
    finally:
        await asyncio.shield(conn.close())
        await redis.aclose()


class RefstreamGroup(click.Group):
    """Every failure in one line: what a command raises and did not word itself is worded
    here (or called a bug); the traceback only with ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            cause = exc.__cause__ or exc.__context__
            if cause is not None and debug:
                traceback.print_exception(cause)
            line = exc.message
            if cause is not None and line.startswith(f"{type(cause).__name__}: "):
                line = _explain(cause) or exc.message  # a bare "Type: message": say what it means
            if line == exc.message and "\n" not in line:
                raise
            raise click.ClickException(" ".join(line.split())) from cause
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            said = (str(exc).strip().splitlines() or [""])[0][:300]
            unexpected = f"{type(exc).__name__}: {said} (unexpected: run with --debug for the traceback)"
            raise click.ClickException(_explain(exc) or unexpected) from None
