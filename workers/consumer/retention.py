"""Retention of the tables that grow with traffic but are not partitioned: run by the
partition maintenance (``workers/consumer/partitions.py``), on Postgres's day, under its lock, and
only when this process's clock agrees with Postgres's.

- ``event_flags``, ``event_drops`` and ``burst_flags`` (by a row's last id): every row whose
  event id is below the horizon, the
  events' own retention (their events' rows are gone or going with their partitions, and
  the worker counts nothing below it, so a redelivery cannot count a drop twice);
- ``webhook_deliveries``: delivered or failed ones made more than
  ``REFSTREAM_WEBHOOK_RETENTION_DAYS`` days ago (pending ones stay until delivered or failed);
  their ``webhook_attempts`` go with them (ON DELETE CASCADE);
- ``affiliate_ips``: an address the affiliate's key was not used from for the event
  retention (an address of long ago is no evidence for a lead of today).

Each delete runs in chunks of ``CHUNK`` rows, its own short transaction each: no long lock,
no huge WAL burst. schema.sql states every table's bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

CHUNK = 10_000

# a burst_flags row goes once every id of it is below the horizon (by its last id, its key);
# a row across the horizon waits for its last (a pass writes a row per day, so only a clock's
# day apart from the ids' makes one)
_BELOW_HORIZON = """
DELETE FROM {table} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))
"""
_DELIVERIES = """
DELETE FROM webhook_deliveries WHERE id = ANY(ARRAY(
    SELECT id FROM webhook_deliveries WHERE status <> 'pending' AND created_at < $1 LIMIT $2))
"""
_IPS = """
DELETE FROM affiliate_ips WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM affiliate_ips WHERE last_seen < $1 LIMIT $2))
"""


@dataclass(slots=True)
class Purged:
    """Rows deleted, per table."""

    tables: dict[str, int] = field(default_factory=dict)


async def _chunks(conn: asyncpg.Connection, sql: str, bound: object, name: str, out: Purged) -> None:
    while True:
        n = int((await conn.execute(sql, bound, CHUNK)).split()[-1])
        if n:
            out.tables[name] = out.tables.get(name, 0) + n
        if n < CHUNK:
            return


async def purge(
    conn: asyncpg.Connection, *, horizon_id: UUID, webhooks_before: datetime, ips_before: datetime
) -> Purged:
    """One retention run: event flags and drops below ``horizon_id``, finished webhook
    deliveries made before ``webhooks_before``, affiliate addresses last seen before
    ``ips_before``."""
    out = Purged()
    tables = [("event_flags", "event_id"), ("event_drops", "event_id")]
    if await conn.fetchval("SELECT to_regclass('burst_flags') IS NOT NULL"):  # schema 25 on
        tables.append(("burst_flags", "last_id"))
    for table, column in tables:
        await _chunks(conn, _BELOW_HORIZON.format(table=table, column=column), horizon_id, table, out)
    await _chunks(conn, _DELIVERIES, webhooks_before, "webhook_deliveries", out)
    await _chunks(conn, _IPS, ips_before, "affiliate_ips", out)
    return out
