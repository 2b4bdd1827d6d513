"""``refstream reconcile`` for ``drop_stats``: the worker's drops and flags, recounted, for
one chunk of links in the reconcile's window (``workers.reconcile``), in its transaction.

What a batch decided is on its rows: test mode and out-of-window and ``bot_counted`` on
the event, an excluded fraud flag in ``event_flags``, a drop without an event (an unknown
code, an inactive link, a duplicate) in ``event_drops``; every flag in ``event_flags``.
The edge's refusals (``source = 'edge'``) have no row to recount them from: they are left
as they are. Drops that no link resolved for are counted under the nil link id, a chunk
of their own (``NO_LINK``).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

NO_LINK = UUID(int=0)

# $1 link ids, $2/$3 the window [from, to), $4 the horizon's event id
_TRUTH = """
CREATE TEMP TABLE reconcile_drops ON COMMIT DROP AS
SELECT workspace_id, link_id, day, reason, detail, count(*)::bigint AS n FROM (
    SELECT e.workspace_id, e.link_id, (e.received_at AT TIME ZONE 'UTC')::date AS day,
           CASE WHEN e.test_mode THEN 'test_mode'
                WHEN e.out_of_window THEN 'out_of_window'
                WHEN e.type = 1 AND e.is_bot AND NOT e.bot_counted THEN 'bot'
                WHEN x.rule IS NOT NULL THEN 'fraud' END AS reason,
           CASE WHEN e.test_mode OR e.out_of_window THEN ''
                WHEN e.type = 1 AND e.is_bot AND NOT e.bot_counted THEN coalesce(e.enrichment->>'bot_reason', '')
                ELSE coalesce(x.rule, '') END AS detail
    FROM events e
    LEFT JOIN LATERAL (SELECT min(f.rule) AS rule FROM event_flags f
                       WHERE f.event_id = e.event_id AND f.excluded) x ON true
    WHERE e.link_id = ANY($1::uuid[]) AND e.received_at >= $2 AND e.received_at < $3 AND e.event_id >= $4
) t WHERE reason IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
UNION ALL
SELECT workspace_id, link_id, (received_at AT TIME ZONE 'UTC')::date, reason, '', count(*)
FROM event_drops
WHERE link_id = ANY($1::uuid[]) AND received_at >= $2 AND received_at < $3 AND event_id >= $4
GROUP BY 1, 2, 3, 4
UNION ALL
SELECT workspace_id, link_id, (received_at AT TIME ZONE 'UTC')::date, 'flagged', rule, count(*)
FROM event_flags
WHERE link_id = ANY($1::uuid[]) AND received_at >= $2 AND received_at < $3 AND event_id >= $4
GROUP BY 1, 2, 3, 5
"""

# $1 link ids, $2/$3 the window's days [from, to)
_STORED = """
SELECT * FROM drop_stats WHERE source = 'worker' AND link_id = ANY($1::uuid[]) AND day >= $2 AND day < $3
"""
_DRIFT = f"""
SELECT coalesce(l.code, '(no link)') AS code, coalesce(s.day, r.day) AS day,
       coalesce(s.reason, r.reason) AS reason, coalesce(s.detail, r.detail) AS detail,
       coalesce(s.n, 0) AS stored, coalesce(r.n, 0) AS recomputed
FROM ({_STORED}) s
FULL JOIN reconcile_drops r USING (workspace_id, link_id, day, reason, detail)
LEFT JOIN links l ON l.id = coalesce(s.link_id, r.link_id)
WHERE coalesce(s.n, 0) <> coalesce(r.n, 0)
ORDER BY 1, 2, 3, 4
"""

_FIX = (
    """
    DELETE FROM drop_stats s
    WHERE s.source = 'worker' AND s.link_id = ANY($1::uuid[]) AND s.day >= $2 AND s.day < $3 AND NOT EXISTS (
        SELECT 1 FROM reconcile_drops r WHERE (r.workspace_id, r.link_id, r.day, r.reason, r.detail)
                                            = (s.workspace_id, s.link_id, s.day, s.reason, s.detail))
    """,
    """
    INSERT INTO drop_stats AS s (workspace_id, link_id, day, reason, detail, source, n)
    SELECT workspace_id, link_id, day, reason, detail, 'worker', n FROM reconcile_drops ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (workspace_id, link_id, day, reason, detail, source) DO UPDATE SET n = EXCLUDED.n
    WHERE s.n <> EXCLUDED.n
    """,
)


async def drift(
    conn: asyncpg.Connection, ids: list[UUID], edges: tuple[Any, Any], days: tuple[Any, Any], horizon_id: UUID,
    *, fix: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """In the caller's transaction: each (link, day, reason, detail) of the links ``ids``
    in the window (``edges``: timestamps; ``days``: the same as dates) whose worker count
    differs from its rows, found before any repair."""
    await conn.execute(_TRUTH, ids, *edges, horizon_id)
    rows = [dict(r) for r in await conn.fetch(_DRIFT, ids, *days)]
    if fix and rows:
        await conn.execute(_FIX[0], ids, *days)
        await conn.execute(_FIX[1])
    return rows
