"""``refstream reconcile`` for ``drop_stats``: the worker's drops and flags, recounted.

What a batch decided is on its rows: test mode and out-of-window and ``bot_counted`` on
the event, an excluded fraud flag in ``event_flags``, a drop without an event (an unknown
code, an inactive link, a duplicate) in ``event_drops``; every flag in ``event_flags``.
The edge's refusals (``source = 'edge'``) have no row to recount them from: they are left
as they are.
"""

from __future__ import annotations

from typing import Any

import asyncpg

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
    WHERE e.link_id IS NOT NULL
) t WHERE reason IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
UNION ALL
SELECT workspace_id, link_id, (received_at AT TIME ZONE 'UTC')::date, reason, '', count(*)
FROM event_drops GROUP BY 1, 2, 3, 4
UNION ALL
SELECT workspace_id, link_id, (received_at AT TIME ZONE 'UTC')::date, 'flagged', rule, count(*)
FROM event_flags GROUP BY 1, 2, 3, 5
"""

_DRIFT = """
SELECT coalesce(l.code, '(no link)') AS code, coalesce(s.day, r.day) AS day,
       coalesce(s.reason, r.reason) AS reason, coalesce(s.detail, r.detail) AS detail,
       coalesce(s.n, 0) AS stored, coalesce(r.n, 0) AS recomputed
FROM (SELECT * FROM drop_stats WHERE source = 'worker') s
FULL JOIN reconcile_drops r USING (workspace_id, link_id, day, reason, detail)
LEFT JOIN links l ON l.id = coalesce(s.link_id, r.link_id)
WHERE coalesce(s.n, 0) <> coalesce(r.n, 0)
ORDER BY 1, 2, 3, 4
"""

_FIX = (
    """
    DELETE FROM drop_stats s WHERE s.source = 'worker' AND NOT EXISTS (
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


async def drift(conn: asyncpg.Connection, *, fix: bool) -> list[dict[str, Any]]:
    """In the caller's transaction: each (link, day, reason, detail) whose worker count
    differs from its rows, found before any repair."""
    await conn.execute(_TRUTH)
    rows = [dict(r) for r in await conn.fetch(_DRIFT)]
    if fix and rows:
        for statement in _FIX:
            await conn.execute(statement)
    return rows
