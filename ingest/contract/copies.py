"""Copies of one keyed event (one ``Idempotency-Key``, its dedupe value ``idem:...``) that
both reached the workers. Each copy a client's attempts made has its own event id (and a
click its own click id); the lowest takes the key's row. Two copies reach the workers when
an attempt answered "may be stored" is in Redis (or in a spool) and its key's record is
not: a Redis failover lost the record, a partition count changed between the spool and
its drain. The attempt answered 200 may then name the copy that lost the key.

The workers file each copy that lost its key to another event as a copy of the stored one:
a row of ``event_dedupe`` whose key is ``copy:<its event id>`` and whose event is the
stored one (kept as long as the key's own row, pruned with it). Whatever looks an event
up by the id an answer gave (an erasure following a lead's click, a late lead's click)
reads ``stored_as`` first: the id an answer named stands for the row that holds its key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import asyncpg

COPY = "copy:"


def key_of(event_id: uuid.UUID) -> str:
    """The ``event_dedupe`` key that files the copy ``event_id`` under the stored one."""
    return COPY + event_id.hex


_STORED_AS = """
SELECT substr(dedupe_key, 6) AS copy, event_id FROM event_dedupe
WHERE workspace_id = $1 AND type = $2 AND dedupe_key = ANY($3::text[])
"""


async def stored_as(
    conn: asyncpg.Connection, workspace_id: str | uuid.UUID, type_: int, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Of ``ids`` (events of ``type_`` in ``workspace_id``), those filed as a copy of a stored
    event: each -> the stored event's id. Read by the key (``event_dedupe``'s primary key)."""
    keys = sorted({key_of(i) for i in ids})
    if not keys:
        return {}
    ws = workspace_id if isinstance(workspace_id, uuid.UUID) else uuid.UUID(workspace_id)
    rows = await conn.fetch(_STORED_AS, ws, type_, keys)
    return {uuid.UUID(hex=r["copy"]): r["event_id"] for r in rows}
