"""Schema migration: apply schema.sql, idempotently, under an advisory lock."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

# any constant will do: it only has to be the same for every concurrent `refstream migrate`
_MIGRATE_LOCK = 0x7265_6673_7472  # "refstr"


def schema_sql() -> str:
    """schema.sql: packaged in the wheel, or at the repository root in a checkout."""
    packaged = resources.files("refstream").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text()


async def migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(schema_sql())


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names when it does not exist; True if it was created."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    name = urlsplit(url).path.lstrip("/")
    server = await asyncpg.connect(url, database="postgres")
    try:
        await server.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except asyncpg.DuplicateDatabaseError:
        return False  # created by a concurrent migrate
    finally:
        await server.close()
    return True
