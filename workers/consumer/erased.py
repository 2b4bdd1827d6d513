"""The erased people's events of a batch, read in the ledger before anything else of the
batch (``ingest.contract.erasure``): stored scrubbed, in the batch's transaction, right
after the ledger's read (``workers.consumer.store``'s lock order).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import asyncpg

from ingest.contract import erasure, erasure_index
from ingest.contract.connections import Command, Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.links import LinkInfo
from ingest.ledger import placement
from ingest.privacy import erasure_copy, erasure_late
from workers.consumer import key_copies

if TYPE_CHECKING:
    from workers.consumer.pipeline import Batch


async def scrub(
    conn: asyncpg.Connection, ledger: erasure.Ledger, everything: list[Envelope], by_code: dict[str, LinkInfo]
) -> int:
    """Scrub, in place, the events of ``everything`` (the batch, one per event id) that the
    ``ledger`` names, and the copies of their keyed events (``key_copies``); how many were
    scrubbed. What they teach the ledger is learnt, and followed, in ``conn``'s transaction."""
    workspaces = {
        id(e): by_code[c].workspace_id
        for e in everything
        if isinstance(c := e.payload.get("code"), str) and c in by_code
    }
    originals = ledger.scrubbed(everything, workspaces)
    originals += key_copies.in_batch(ledger.key, everything, originals, workspaces)
    scrubbed = len(originals)
    # a copy of their keyed event an earlier batch stored holds the key's row: theirs too
    originals += await key_copies.stored(conn, originals, [e.event_id for e in everything])
    # one that links the person to a visitor or a click their erasure could not know (a
    # lead that arrives late): those join the ledger, and their rows are scrubbed now
    # what they teach the ledger (a late lead's click is the person's), and the erasure
    # pending again for the sweep; the click's row scrubbed now, and this batch's copy
    if await erasure.learn(conn, ledger.key, originals):
        await erasure_late.follow(conn, ledger.key, originals)
        again = await erasure.Ledger.read(conn, everything)
        scrubbed += len(again.scrubbed(everything, workspaces))
    return scrubbed


async def restore_ledger(
    place: placement.Placement, redis: Redis, keys: Keys, shards: Collection[str] | None = None
) -> dict[str, Exception]:
    """The erasures a restore of Postgres (or a failover) lost, back from their copy in Redis
    (``ingest.privacy.erasure_copy``) on every shard (or those of ``shards``), each where its
    workspace is; and the ledger's salt read (every shard shares the directory's): a worker
    whose first batches go to a waiting room writes no row, and must still file their late
    entries for the erasure sweep (``filed``), which it cannot do without the salt. Each
    shard on its own: those that failed, by name, with their errors (one shard down never
    keeps the others' restores from being made)."""
    if erasure.known_salt() is None:
        async with place.directory.acquire() as conn:
            await erasure.salt(conn)
    pools = await place.pools()
    failed: dict[str, Exception] = {}
    for name, pool in pools.items():
        if shards is not None and name not in shards:
            continue

        async def here(ws: str, name: str = name) -> bool:
            return await place.shard_of(ws) == name

        try:
            await erasure_copy.restore(pool, redis, keys, here if len(pools) > 1 else None)
        except Exception as exc:  # the caller's to judge: an outage waits
            failed[name] = exc
    return failed


def filed(keys: Keys, batch: Batch) -> list[Command]:
    """The commands that file the entries of ``batch`` an erasure's sweep cannot find by
    their event's row and time (appended long after their event, or stored as no row) under
    their ledger digests (``ingest.contract.erasure_index``): sent before the batch's ack."""
    salt = erasure.known_salt()
    if salt is None or not batch.good:
        return []
    # those no row holds, and copies of an event a row holds already (a spooled or requeued
    # copy): the sweep looks for one entry of an event by its time
    other = batch.result.rowless | batch.result.copies if batch.result is not None else set()
    owners = batch.result.owners if batch.result is not None else {}
    out: list[Command] = []
    # each entry of the batch with its own envelope: an event read twice, once per entry
    for e, sid in ((e, batch.entry_id(e)) for e in batch.good):
        code = e.payload.get("code")  # an event taken without its link: its link's workspace
        ws = e.workspace_id or (owners.get(code) if isinstance(code, str) else None)
        if sid is None or ws is None:
            continue
        copy = sid != batch.stream_ids.get(e.event_id)  # not the event's first entry in the batch
        if e.event_id in other or not erasure_index.near(e.event_id, sid) or copy:
            out += erasure_index.entry_commands(keys, salt, batch.partition, sid, e, ws)
    return out
