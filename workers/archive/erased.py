"""The archive and the erasure ledger: the entries of a segment that name an erased person,
scrubbed (``ingest.contract.erasure``).

The archiver is a writer like the workers: it checks the ledger before a segment's upload
and again after it, so a segment never keeps the raw entries of a person whose erasure
committed before its second look; one whose erasure commits after that look is in the store
when the erasure's sweep lists it (``workers.ops.erasure``), which rewrites it with the same
function. What a raw copy teaches the ledger (a lead's click is the person's) is learned
where it is met, as a worker storing it would learn it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.contract import erasure, wire
from ingest.contract.events import Envelope
from ingest.contract.wire import FIELD, EnvelopeError

Row = tuple[str, dict[bytes, bytes]]  # a stream id and an entry's fields


def decoded(rows: list[Row] | list[tuple[Any, dict[bytes, bytes] | None]]) -> list[tuple[int, Envelope]]:
    """(index, envelope) of each row that holds one (a version-1 blob, version-2 fields or version 3's one)."""
    out = []
    for i, (_, fields) in enumerate(rows):
        if not fields:
            continue
        try:
            out.append((i, wire.from_entry(fields)))
        except EnvelopeError:
            continue  # not an event (a poison entry): nobody stores it, it names nobody
    return out


def fields_of(e: Envelope) -> dict[bytes, bytes]:
    """``e`` as a stream entry's fields (version 3)."""
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in wire.to_entry_dict(e).items()}


def as_entry(before: dict[bytes, bytes], e: Envelope) -> dict[bytes, bytes]:
    """``e`` in the form of the entry it replaces: a version-1 blob stays a blob."""
    return {FIELD: wire.to_blob(e)} if FIELD in before and len(before) == 1 else fields_of(e)


async def scrubbed(conn: asyncpg.Connection, rows: list[Row], *, met: bool) -> tuple[list[Row], int]:
    """``rows`` with each entry the ledger names that still holds personal data scrubbed, and
    how many were. ``met``: the caller met those raw copies on their way (the archiver), and
    the erasure is pending again for the sweep to find their other copies; False (the
    sweep, which is that finding) only where the copies taught the ledger something new."""
    found = decoded(rows)
    if not found:
        return rows, 0
    ledger = await erasure.Ledger.read(conn, [e for _, e in found])
    if not ledger.erased:
        return rows, 0
    hits = [
        (i, e, s) for i, e in found if ledger.names(e) and (s := erasure.scrub(ledger.key, e, ledger.workspace(e))) != e
    ]
    if not hits:
        return rows, 0
    await erasure.learn(conn, ledger.key, [(e, ledger.workspace(e)) for _, e, _ in hits], met=met)
    out = list(rows)
    for i, _, s in hits:
        sid, before = rows[i]
        out[i] = (sid, as_entry(before, s))
    return out, len(hits)


async def scrubbed_by_shard(by_pool: erasure.ByPool, rows: list[Row], *, met: bool) -> tuple[list[Row], int]:
    """``scrubbed``, each entry against the ledger of its workspace's shard: an erasure is
    in the ledger of its workspace's shard alone."""
    found = decoded(rows)
    if not found:
        return rows, 0
    out, n = list(rows), 0
    for pool, indexes in (await by_pool([e for _, e in found])).items():
        at = [found[k][0] for k in indexes]
        async with pool.acquire() as conn:
            part, m = await scrubbed(conn, [rows[i] for i in at], met=met)
        for i, row in zip(at, part, strict=True):
            out[i] = row
        n += m
    return out, n
