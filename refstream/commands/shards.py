"""``refstream shards``: the Postgres primaries workspaces are placed on. ``add`` migrates
a database and registers it; ``list`` shows each with its workspaces. The directory, and
the first shard (``default``), is ``DATABASE_URL``'s database (docs/shards.md)."""

from __future__ import annotations

from typing import Any

import asyncpg
import click

from ingest.contract.settings import Settings
from ingest.ledger import directory as directory_mod
from ingest.ledger import placement
from refstream import output as out
from refstream.commands.migrate import migrate_database
from refstream.runner import open_database, print_data, run_command


@click.group()
def shards() -> None:
    """Postgres primaries that hold workspaces."""


@shards.command("add")
@click.argument("name")
@click.argument("dsn")
@out.json_option
def shards_add(name: str, dsn: str) -> None:
    """Migrate the database at DSN (created if missing) and add it as shard NAME. New
    workspaces may then be placed on it (`workspace create --shard NAME`, or the shard with
    the fewest workspaces). A password in DSN is kept sealed under REFSTREAM_SECRET_KEY;
    listings show the DSN without it."""

    async def go(settings: Settings) -> dict[str, Any]:
        try:
            placement.check_name(name)
            password = placement.split_password(dsn)[1]
        except placement.ShardError as exc:
            raise click.ClickException(str(exc)) from None
        if password is not None and not settings.secret_key:
            raise click.ClickException(
                "the DSN holds a password: set REFSTREAM_SECRET_KEY (`refstream secret-key`) to keep it sealed,"
                " or give the password in a .pgpass file instead"
            )
        created = await migrate_database(settings, dsn, name)
        conn = await open_database(settings)
        try:
            there = await asyncpg.connect(dsn, timeout=settings.connect_timeout_s)
            try:
                await directory_mod.share_salt(conn, there)
            finally:
                await there.close()
            shard = await directory_mod.add_shard(conn, name, dsn, settings.secret_key)
        except placement.ShardError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await conn.close()
        return {"shard": shard.name, "dsn": shard.dsn, "database_created": created}

    print_data(run_command(go))


@shards.command("list")
@out.json_option
def shards_list() -> None:
    """Every shard, with its DSN (without a password) and how many workspaces it holds."""

    async def go(settings: Settings) -> list[dict[str, Any]]:
        conn = await open_database(settings)
        try:
            return await directory_mod.list_shards(conn)
        finally:
            await conn.close()

    rows = run_command(go)
    if out.wants_json():
        out.print_json(rows)
        return
    table = out.table("shards", "name", "dsn", "workspaces", left=("name", "dsn"))
    for r in rows:
        table.add_row(r["name"], r["dsn"], str(r["workspaces"]))
    out.console().print(table)
