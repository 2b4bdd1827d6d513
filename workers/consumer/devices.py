"""The ``event_devices`` dictionary (schema.sql, version 16): what a User-Agent says of the
browser, and the versions of the data and parsers that said it, stored once and named by
each enriched row's ``device_id`` instead of written into every row's ``enrichment``.

A batch's entries are made before its transaction, in a statement of their own that
commits at once (``store._write_retried``): a new browser build is written once, by
whichever batch meets it first, and no batch holds a lock on it while it stores its
events. An entry made for a batch that then rolls back is named by no row; it is no one's
data (an erasure never scrubbed the device fields) and the next batch of that browser
names it. Entries are never deleted, so an id once read stays right."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from ingest.contract import jsonrows
from workers.consumer.enrich import Enricher

# a Found.device -> its entry's id
Known = dict[tuple[Any, ...], int]

# made in one order (a new entry waits only on another batch's statement, never on a
# transaction), and found: made by this statement, or there before it. One made by another
# statement since this one's snapshot conflicts and is not seen: ``ids`` asks again
_ENSURE = f"""
WITH x AS (SELECT * FROM {jsonrows.table(("integer", "jsonb"), "x(n, doc)")}),
made AS (
    INSERT INTO event_devices (doc) SELECT DISTINCT doc FROM x ORDER BY doc
    ON CONFLICT (doc) DO NOTHING
    RETURNING id, doc
)
SELECT x.n, coalesce(m.id, d.id) AS id
FROM x LEFT JOIN made m ON m.doc = x.doc LEFT JOIN event_devices d ON d.doc = x.doc
"""
_TRIES = 3


async def ids(
    conn: asyncpg.Connection, enricher: Enricher | None, user_agents: Sequence[str | None], known: Known | None = None
) -> Known:
    """``known`` and the entry of every device these User-Agents name that it lacks, made
    where there is none yet."""
    known = dict(known or {})
    if enricher is None or not user_agents:
        return known
    wanted = sorted({enricher.device_of(ua) for ua in user_agents} - known.keys(), key=repr)
    for _ in range(_TRIES):
        todo = [d for d in wanted if d not in known]
        if not todo:
            return known
        rows = await conn.fetch(_ENSURE, jsonrows.doc([(n, enricher.device_doc(d)) for n, d in enumerate(todo)]))
        known.update({todo[r["n"]]: r["id"] for r in rows if r["id"] is not None})
    missing = [d for d in wanted if d not in known]
    if missing:
        raise RuntimeError(f"event_devices: {len(missing)} entries neither made nor found")
    return known
