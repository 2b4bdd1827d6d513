"""The other copies of an erased person's keyed event (one ``Idempotency-Key``, its dedupe
value ``idem:...``): each copy a client's retries made carries its own event and click ids,
and the ledger names only the copy whose answer a lead named. The lowest event id takes
the key's claim, so the row of the key may be a copy the ledger does not name (issue 64,
the generative test's seed 1246373390: the copy a full Redis spooled was stored raw beside
its erased lead). Both places a sibling can be are reached:

- in this batch (``in_batch``): scrubbed in place, as the named copy is;
- stored by an earlier batch (``stored``): the named copy teaches the ledger the stored
  row's click and visitor, as a late lead teaches it its click, and the row is scrubbed
  now (``ingest.privacy.erasure_late.follow``).

A copy that lost its key to another event is filed as a copy of the stored one (``file``:
``ingest.contract.copies``), whoever it belongs to: an answer may have named it.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from ingest.contract import clicks, copies, erasure, jsonrows
from ingest.contract.events import Envelope

Original = tuple[Envelope, str | None]  # an erased person's event as it came, and its workspace


def _keyed(originals: list[Original]) -> dict[tuple[str, str], Envelope]:
    """(workspace, dedupe value) -> the named copy, of the originals under a client's key."""
    out: dict[tuple[str, str], Envelope] = {}
    for e, ws in originals:
        d = e.payload.get("dedupe")
        w = e.workspace_id or ws
        if isinstance(d, str) and d.startswith("idem:") and w is not None:
            out.setdefault((w, d), e)
    return out


def in_batch(
    key: bytes, envelopes: list[Envelope], originals: list[Original], workspaces: dict[int, str]
) -> list[Original]:
    """Scrub, in place, the other copies in this batch of the originals' keyed events. The
    copies scrubbed, as they came (``Ledger.scrubbed``'s shape)."""
    named = _keyed(originals)
    if not named:
        return []
    out: list[Original] = []
    for i, e in enumerate(envelopes):
        ws = e.workspace_id or workspaces.get(id(e))
        d = e.payload.get("dedupe")
        if isinstance(d, str) and ws is not None and (ws, d) in named and (scrubbed := erasure.scrub(key, e, ws)) != e:
            envelopes[i] = scrubbed
            out.append((e, ws))
    return out


# the rows that hold the claim of a key one of the batch's originals carries, stored by an
# earlier batch (another event id than any of this batch's)
_HOLDERS = """
SELECT x.n, e.event_id, e.visitor_id, e.click_id
FROM unnest($1::uuid[], $2::smallint[], $3::text[], $4::int[]) AS x (workspace_id, type, dedupe_key, n)
JOIN event_dedupe d USING (workspace_id, type, dedupe_key)
JOIN events e ON e.event_id = d.event_id AND e.workspace_id = d.workspace_id
WHERE NOT (d.event_id = ANY($5::uuid[]))
"""


async def stored(conn: asyncpg.Connection, originals: list[Original], batch: list[UUID]) -> list[Original]:
    """The rows an earlier batch stored for the keys of the originals' keyed events, each as
    what its named copy teaches the ledger: an envelope of the named copy's id (the ledger
    names it) whose click and visitor are the stored row's. ``erasure.learn`` takes them in
    (unless another customer holds them too), and ``erasure_late.follow`` scrubs their rows."""
    named = list(_keyed(originals).items())
    if not named:
        return []
    rows = await conn.fetch(
        _HOLDERS,
        [UUID(ws) for (ws, _), _ in named],
        [int(e.type) for _, e in named],
        [d for (_, d), _ in named],
        list(range(len(named))),
        batch,
    )
    out: list[Original] = []
    for r in rows:
        (ws, _), e = named[r["n"]]
        payload: dict[str, object] = {}
        if r["click_id"] is not None:
            payload["click_id"] = clicks.mint(r["click_id"])
        if isinstance(r["visitor_id"], str) and not erasure.is_pseudonym(r["visitor_id"]):
            payload["visitor_id"] = r["visitor_id"]
        if payload:
            out.append(
                (Envelope(e.type, e.dialect, payload, ws, event_id=e.event_id, received_at_ms=e.received_at_ms), ws)
            )
    return out


# the keyed copies that lost their key's claim to another event: each filed under its own
# id as a copy of the stored one (``ingest.contract.copies``)
_LOST = jsonrows.table(
    ("uuid", "smallint", "text", "uuid", "text"), "x(workspace_id, type, dedupe_key, event_id, copy)"
)
_FILE = f"""
INSERT INTO event_dedupe (workspace_id, type, dedupe_key, event_id, received_at)
SELECT x.workspace_id, x.type, x.copy, d.event_id, d.received_at
FROM {_LOST}
JOIN event_dedupe d USING (workspace_id, type, dedupe_key)
WHERE d.event_id <> x.event_id
ORDER BY 1, 2, 3
ON CONFLICT DO NOTHING
"""


async def file(conn: asyncpg.Connection, lost: list[tuple[str, int, str, UUID]]) -> None:
    """File each of ``lost`` ((workspace, type, dedupe value, event id) of a copy whose key's
    claim it lost) held by another event as a copy of that event. A key held by the copy's
    own id (a redelivery) files nothing."""
    keyed = [(ws, t, d, e, copies.key_of(e)) for ws, t, d, e in lost if d.startswith("idem:")]
    if keyed:
        await conn.execute(_FILE, jsonrows.doc(keyed))
