"""``refstream migrate``: schema.sql applied, the database created if it is missing, and
the partitions of the days around today made before any batch inserts."""

from __future__ import annotations

from typing import Any

import asyncpg
import click

from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.manage.db import ensure_database
from ingest.manage.db import migrate as apply_schema
from refstream import output as out
from refstream.runner import print_data, run_command
from workers.consumer import partitions


@click.command()
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
                conn,
                retention_days=settings.event_retention_days,
                dedupe_days=settings.dedupe_retention_days,
                skew_max_s=settings.clock_skew_max_s,
                webhook_days=settings.webhook_retention_days,
            )
        finally:
            await conn.close()
        return {"migrated": True, "database_created": created}

    print_data(run_command(go))
