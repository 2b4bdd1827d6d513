"""``refstream migrate``: schema.sql applied to the directory's database (``DATABASE_URL``)
and then to every shard it lists, each created if it is missing, and the partitions of the
days around today made before any batch inserts."""

from __future__ import annotations

from typing import Any

import asyncpg
import click

from ingest.contract.settings import Settings
from ingest.ledger import directory as directory_mod
from ingest.ledger import placement
from ingest.manage import schema_check
from ingest.manage.db import ensure_database
from ingest.manage.db import migrate as apply_schema
from refstream import output as out
from refstream.runner import print_data, run_command
from workers.consumer import partitions


async def migrate_database(settings: Settings, url: str, shard: str = placement.DEFAULT) -> bool:
    """Bring the database at ``url``, shard ``shard``, to this build's schema (created if
    missing); True if it was created."""
    status = await schema_check.check_url(url)
    if status.kind not in (schema_check.Kind.OK, schema_check.Kind.NO_DATABASE, schema_check.Kind.NOT_MIGRATED):
        named = "" if shard == placement.DEFAULT else f"shard {shard}: "
        raise click.ClickException(named + status.line(url))
    created = await ensure_database(url)
    conn = await asyncpg.connect(url, timeout=schema_check.CONNECT_TIMEOUT_S)
    try:
        await apply_schema(conn)
        # the days around today get their partitions now, before any batch inserts
        await partitions.maintain(
            conn,
            retention_days=settings.event_retention_days,
            dedupe_days=settings.dedupe_retention_days,
            skew_max_s=settings.clock_skew_max_s,
            webhook_days=settings.webhook_retention_days,
        )
    finally:
        await conn.close()
    return created


@click.command()
@out.json_option
def migrate() -> None:
    """Apply schema.sql to the database and to every shard (idempotent; creates a database
    that is missing)."""

    async def go(settings: Settings) -> dict[str, Any]:
        created = await migrate_database(settings, settings.database_url)
        conn = await asyncpg.connect(settings.database_url, timeout=schema_check.CONNECT_TIMEOUT_S)
        try:
            shards = await directory_mod.shard_dsns(conn, settings.secret_key)
        finally:
            await conn.close()
        for name, url in shards.items():
            await migrate_database(settings, url, name)
        return {"migrated": True, "database_created": created, "shards": [placement.DEFAULT, *shards]}

    print_data(run_command(go))
