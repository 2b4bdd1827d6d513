"""What the erasure ledger learns after an erasure (``ingest.contract.erasure``): whether
another customer holds a person's visitor or click too (``held_by_others``), and what an
erased person's event met later adds to their erasure (``learn``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ingest.contract import clicks, copies, fence
from ingest.contract.erasure_ids import EVENT, EXTERNAL, VISITOR, digest, digests_of, is_pseudonym
from ingest.contract.events import Envelope, EventType

# the customers other than the person on a visitor (a lead or sale of theirs carries it, or
# its customers row names them) and on a click (a lead or sale of theirs names it); a click's
# own visitor
_ON_VISITORS = """
SELECT visitor_id AS id, customer_external_id AS who FROM events
WHERE workspace_id = $1 AND visitor_id = ANY($2::text[]) AND customer_external_id IS NOT NULL
UNION
SELECT visitor_id, external_id FROM customers
WHERE workspace_id = $1 AND visitor_id = ANY($2::text[]) AND external_id IS NOT NULL
"""
_ON_CLICKS = """
SELECT click_id AS id, customer_external_id AS who FROM events
WHERE workspace_id = $1 AND click_id = ANY($2::uuid[]) AND click_id <> event_id AND customer_external_id IS NOT NULL
"""
_CLICK_VISITORS = """
SELECT event_id, visitor_id FROM events
WHERE event_id = ANY($2::uuid[]) AND workspace_id = $1 AND visitor_id IS NOT NULL
"""
_ERASED = """
SELECT array(SELECT digest FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2)
"""


async def held_by_others(
    conn: asyncpg.Connection,
    key: bytes,
    workspace_id: str,
    external_id: str | None,
    visitors: list[str],
    clicks: list[uuid.UUID],
) -> tuple[set[str], set[uuid.UUID]]:
    """Which of an erased person's ``visitors`` and ``clicks`` another customer of the
    workspace holds too (one browser, two sign-ups): a visitor another customer's lead or
    sale carries, or whose customers row names another; a click another's lead or sale
    names, or whose visitor is shared. Another customer: a customer id that is not
    ``external_id`` and that the workspace's ledger does not name (an erased person's, this
    one's under another spelling or an earlier erasure's, is no one else's). Read by index
    (``events_workspace_visitor_known``, ``events_workspace_named_click``, the key)."""
    if not visitors and not clicks:
        return set(), set()
    of_click = {r["event_id"]: r["visitor_id"] for r in await conn.fetch(_CLICK_VISITORS, workspace_id, clicks)}
    candidates = sorted({*visitors, *of_click.values()} - {None})
    on = [(r["id"], r["who"]) for r in await conn.fetch(_ON_VISITORS, workspace_id, candidates)] if candidates else []
    naming = [(r["id"], r["who"]) for r in await conn.fetch(_ON_CLICKS, workspace_id, clicks)] if clicks else []
    whos = {w for _, w in on + naming if w != external_id and not is_pseudonym(w)}
    digests = {digest(key, EXTERNAL, w, workspace_id): w for w in sorted(whos)}
    erased = {bytes(d) for d in await conn.fetchval(_ERASED, list(digests), workspace_id)} if digests else set()
    others = {w for d, w in digests.items() if d not in erased}
    shared_visitors = {v for v, w in on if w in others}
    shared_clicks = {c for c, w in naming if w in others} | {c for c, v in of_click.items() if v in shared_visitors}
    return shared_visitors, shared_clicks


_LEARN = """
INSERT INTO erased_ids (digest, erasure_id, kind, workspace_id)
SELECT d, $1, k, $4 FROM unnest($2::bytea[], $3::text[]) AS x(d, k)
ON CONFLICT (digest, workspace_id) DO NOTHING
RETURNING digest
"""
# a click minted longer before the lead that names it than this: its id's time is not trusted
CLICK_BEFORE_MS = 400 * 86_400_000


def first_ms(at_ms: int | None, named: Iterable[uuid.UUID]) -> int | None:
    """The earliest of ``at_ms`` (an event's time) and the times of the clicks it names: where
    the archive pass over a person's copies begins. A click's id time is its edge's word,
    so one minted after the event, or more than ``CLICK_BEFORE_MS`` before it, is not taken
    (with no ``at_ms``, every click's is)."""
    times = [c.int >> 80 for c in named]
    if at_ms is not None:
        times = [t for t in times if 0 <= at_ms - t <= CLICK_BEFORE_MS]
    return min([t for t in (at_ms, *times) if t is not None], default=None)


_AGAIN = """
UPDATE erasures SET since = least(since, $2), redis_at = NULL, archive_at = NULL, generation = generation + 1
WHERE id = $1
"""


def _click_of(e: Envelope) -> uuid.UUID | None:
    return clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None


async def _more(conn: asyncpg.Connection, key: bytes, e: Envelope, ws: str) -> list[tuple[bytes, str]]:
    """The visitor and the click ``e`` names, as ledger entries, unless another customer's
    events name them too (a browser two signed up from is not theirs alone)."""
    more: list[tuple[bytes, str]] = []
    v = e.payload.get("visitor_id")
    visitor = v if isinstance(v, str) and v and not is_pseudonym(v) else None
    cid = _click_of(e)
    if visitor is None and cid is None:
        return more
    x = e.payload.get("external_id")
    own = x if isinstance(x, str) and not is_pseudonym(x) else None
    held_v, held_c = await held_by_others(conn, key, ws, own, [visitor] if visitor else [], [cid] if cid else [])
    if visitor is not None and visitor not in held_v:
        more.append((digest(key, VISITOR, visitor), VISITOR))
    if cid is not None and cid not in held_c:
        more.append((digest(key, EVENT, cid.hex), EVENT))
        # the row that holds its key, where the click is a copy (``copies``)
        for stored in (await copies.stored_as(conn, ws, int(EventType.CLICK), [cid])).values():
            more.append((digest(key, EVENT, stored.hex), EVENT))
    return more


async def _fenced(conn: asyncpg.Connection, ws: str) -> None:
    """Before a write of ``ws``'s ledger on this shard: the workspace's fence lock held
    shared until the transaction ends, and ``Moved`` if it has moved away. A move's fence
    waits for the lock, and its last catch up copies what was written before it; a write
    after it, here, would be lost to the workspace's new shard. (The erasure sweep and the
    archiver learn outside the workers' batches, which hold the lock already: a click an
    erased customer's lead named, learned on the old copy after the move's last catch up,
    kept its referrer on the new one, in its row and its stream entry; the generative test's
    seed 1986416062, ``erased_kept``.)"""
    await conn.execute(fence.FENCE_LOCK, [ws])
    # moved away, arriving by a move, or dropped by one since its ledger was read
    if await conn.fetch(fence.FENCE_NOT_HERE, [ws]):
        raise fence.Moved(f"workspace {ws} moved away while its erasure learned", [str(ws)])


async def learn(
    conn: asyncpg.Connection, key: bytes, originals: list[tuple[Envelope, str | None]], *, met: bool = True
) -> bool:
    """What an erased person's event (unscrubbed, with its workspace) teaches the ledger,
    where a writer meets one after the erasure: the visitor and the click it names join the
    erasure's entries (a lead's click is the person's), and the erasure is pending again
    from the event's time (or its click's, if earlier) on, so that the sweep finds its raw
    copies in Redis and the archive, and its rows and its click's behind the fence
    (``recheck``). ``met`` False (the sweep, which scrubs the copy it met itself): pending
    again only where a visitor or a click joined. Whether any joined."""
    joined: set[Any] = set()
    touched: dict[Any, int] = {}
    spaces: dict[Any, str] = {}  # each erasure's workspace
    async with conn.transaction():  # the fence locks below last until the caller's commit
        for e, ws in originals:
            ws = e.workspace_id or ws
            if ws is None:
                continue  # no workspace, no ledger names it
            found = await conn.fetchval(
                "SELECT erasure_id FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2 LIMIT 1",
                digests_of(key, e, ws),
                ws,
            )
            if found is None:
                continue
            spaces[found] = ws
            more = await _more(conn, key, e, ws)
            at = first_ms(e.received_at_ms, [cid] if (cid := _click_of(e)) is not None else [])
            assert at is not None
            touched[found] = min(touched.get(found, at), at)
            if more:
                await _fenced(conn, ws)
                if await conn.fetch(_LEARN, found, [d for d, _ in more], [k for _, k in more], ws):
                    joined.add(found)
        for erasure_id, ms in sorted(touched.items(), key=lambda t: str(t[0])):
            if met or erasure_id in joined:
                await _fenced(conn, spaces[erasure_id])
                await conn.execute(_AGAIN, erasure_id, datetime.fromtimestamp(ms / 1000, UTC))
    return bool(joined)
