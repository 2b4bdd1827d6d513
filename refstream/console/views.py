"""The console's reads of Postgres: pending erasures (``refstream erase --status``'s list)
and one workspace's links per day, with what did not count and why (``link show``'s
numbers, for every link of the workspace at once).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.ledger.placement import Placement
from workers.ops import erasure

DAYS = 30

# one workspace's links by day: counted events, sales and drops, each from its own table
_DAILY = """
SELECT l.code, d.day, d.clicks, d.leads, d.conversions
FROM daily_stats d JOIN links l ON l.id = d.link_id
WHERE d.workspace_id = $1 AND d.day > current_date - $2::int
ORDER BY d.day DESC, l.code
"""
_SALES = """
SELECT l.code, s.day, sum(s.sales)::bigint AS sales
FROM sale_stats s JOIN links l ON l.id = s.link_id
WHERE s.workspace_id = $1 AND s.day > current_date - $2::int
GROUP BY l.code, s.day
"""
_DROPS = """
SELECT coalesce(l.code, '(no link)') AS code, s.day, s.reason, sum(s.n)::bigint AS n
FROM drop_stats s LEFT JOIN links l ON l.id = s.link_id
WHERE s.workspace_id = $1 AND s.day > current_date - $2::int AND s.reason <> 'flagged'
GROUP BY 1, s.day, s.reason
"""


async def erasures(pool: asyncpg.Pool | Placement) -> list[dict[str, Any]]:
    """Every erasure with a place pending, its deadline, and whether it is past it; with
    several shards, every shard's, each with its shard's name."""
    if not isinstance(pool, Placement):
        return await erasure.status(pool)
    pools = await pool.pools()
    if len(pools) == 1:
        return await erasure.status(pool.directory)
    found = [row | {"shard": name} for name, there in pools.items() for row in await erasure.status(there)]
    return sorted(found, key=lambda row: str(row["requested_at"]))


async def tenant_links(pool: asyncpg.Pool | Placement, workspace_id: str) -> list[dict[str, Any]]:
    """Per link and UTC day of the last ``DAYS``, newest first: clicks, leads, conversions,
    sales, and drops by reason. Only ``workspace_id``'s rows (every query names it), read
    on the shard it is on."""
    if isinstance(pool, Placement):
        pool = await pool.pool(workspace_id)
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(code: str, day: Any) -> dict[str, Any]:
        key = (day.isoformat(), code)
        return rows.setdefault(
            key,
            {"day": key[0], "link": code, "clicks": 0, "leads": 0, "conversions": 0, "sales": 0, "drops": {}},
        )

    async with pool.acquire() as conn:
        for r in await conn.fetch(_DAILY, workspace_id, DAYS):
            row(r["code"], r["day"]).update(clicks=r["clicks"], leads=r["leads"], conversions=r["conversions"])
        for r in await conn.fetch(_SALES, workspace_id, DAYS):
            row(r["code"], r["day"])["sales"] = r["sales"]
        for r in await conn.fetch(_DROPS, workspace_id, DAYS):
            row(r["code"], r["day"])["drops"][r["reason"]] = r["n"]
    return [rows[k] for k in sorted(rows, reverse=True)]
