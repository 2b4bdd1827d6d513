"""A writer's read of the erasure ledger (``ingest.contract.erasure``): ``Ledger.read`` in a
batch's transaction (beside a query of the caller's: ``Then``), and ``held`` for a writer
outside the workers (a spool's drain, an import)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ingest.contract import fence
from ingest.contract.connections import PG_ERRORS, pg_unavailable
from ingest.contract.erasure_ids import EXTERNAL, LOCK, digest, digests_of, is_pseudonym, salt, scrub
from ingest.contract.erasure_learn import learn
from ingest.contract.errors import Outage
from ingest.contract.events import Envelope

# a batch's look at the ledger, holding the lock shared until its commit: an erasure, once
# its ledger is in, takes the lock exclusive and so waits for every batch that looked
# before (``ingest.privacy.erasure``); one statement, one round trip per batch. Each entry
# is one workspace's (docs/privacy.md): every digest is asked in the workspace of the event
# that carries it, never in any other (``$2``: each a digest's 16 bytes and its
# workspace's, ``_pairs``). One plan, however many digests: the array behind a scalar
# subquery, as ``ingest.contract.plans.any_of`` puts it
_ASKED = """
SELECT substring(p FROM 1 FOR 16) AS d, encode(substring(p FROM 17 FOR 16), 'hex')::uuid AS ws
FROM unnest((SELECT $2::bytea[])::bytea[]) AS p
"""
_READ = f"""
SELECT array(SELECT i.workspace_id::text FROM erased_ids i JOIN ({_ASKED}) a
             ON i.digest = a.d AND i.workspace_id = a.ws ORDER BY i.digest, i.workspace_id),
       array(SELECT i.digest FROM erased_ids i JOIN ({_ASKED}) a
             ON i.digest = a.d AND i.workspace_id = a.ws ORDER BY i.digest, i.workspace_id)
FROM (SELECT pg_advisory_xact_lock_shared($1)) l
"""
_WORKSPACE_BYTES: dict[str, bytes] = {}  # a workspace's id -> its 16 bytes (a process knows a few)


def _pairs(asked: Iterable[tuple[bytes, str]]) -> list[bytes]:
    """(digest, workspace) pairs as ``_READ`` asks them: each a digest and its workspace's bytes."""
    out = set()
    for d, ws in asked:
        raw = _WORKSPACE_BYTES.get(ws)
        if raw is None:
            if len(_WORKSPACE_BYTES) >= 10_000:
                _WORKSPACE_BYTES.clear()
            raw = _WORKSPACE_BYTES[ws] = uuid.UUID(ws).bytes
        out.add(d + raw)
    return list(out)


@dataclass(frozen=True, slots=True)
class Then:
    """A query to run beside the ledger's read (``Ledger.read_with``): its text, whose
    parameters start at ``$3``, and their values."""

    query: str
    args: tuple[Any, ...]


def then_after(query: str) -> str:
    """The ledger's read and ``query``'s rows in one statement, at one snapshot (taken as
    the statement starts, as the ledger's read alone takes it): every row carries the
    ledger's two arrays (``erased_workspaces``, ``erased_digests``) and ``then_row``, NULL
    on the one row that stands for none when ``query`` has no rows."""
    return f"""
SELECT g.erased_workspaces, g.erased_digests, q.*
FROM ({_READ.strip()}) AS g (erased_workspaces, erased_digests)
LEFT JOIN LATERAL (SELECT true AS then_row, t.* FROM ({query}) t) q ON true
"""


# an envelope with no workspace of its own (an entry written before envelopes carried one):
# its link's
_CODES = "SELECT code, workspace_id::text AS ws FROM links WHERE code = ANY($1::text[])"


@dataclass(frozen=True, slots=True)
class Ledger:
    """The ledger's entries that a set of events named (``Ledger.read``): each a workspace's
    (its id, the digest), and a workspace for a link code where an envelope has none."""

    key: bytes
    erased: frozenset[tuple[str, bytes]]
    codes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    async def read(
        cls,
        conn: asyncpg.Connection,
        envelopes: Iterable[Envelope],
        workspace_of: Mapping[int, str | None] | None = None,
    ) -> Ledger:
        """The entries that name any of ``envelopes``. ``workspace_of`` (by ``id()`` of an
        envelope) gives a workspace where the envelope has none (a click's, from its link)."""
        ledger, _ = await cls.read_with(conn, envelopes, workspace_of)
        return ledger

    @classmethod
    async def read_with(
        cls,
        conn: asyncpg.Connection,
        envelopes: Iterable[Envelope],
        workspace_of: Mapping[int, str | None] | None = None,
        then: Then | None = None,
    ) -> tuple[Ledger, list[asyncpg.Record]]:
        """``read``, and in the same round trip the rows of ``then``: a query of the caller's
        (its text and its arguments, numbered from ``$3``), run beside the ledger's read in
        one statement (``then_after``): a batch's first round trip reads both."""
        key = await salt(conn)
        envelopes = list(envelopes)
        given = workspace_of or {}
        # an envelope with no workspace of its own nor the caller's (an entry written before
        # envelopes carried one): its link's, read first, so that each digest is asked in its
        # own workspace
        unplaced = {
            c
            for e in envelopes
            if not (e.workspace_id or given.get(id(e))) and isinstance(c := e.payload.get("code"), str)
        }
        codes = {r["code"]: r["ws"] for r in await conn.fetch(_CODES, sorted(unplaced))} if unplaced else {}
        asked = []
        for e in envelopes:
            code = e.payload.get("code")
            ws = e.workspace_id or given.get(id(e)) or (codes.get(code) if isinstance(code, str) else None)
            if ws is not None:  # no workspace: no ledger names it
                asked += [(d, ws) for d in digests_of(key, e, ws)]
        wanted = _pairs(asked)
        if then is None:
            spaces, found = await conn.fetchrow(_READ, LOCK, wanted)
            rows: list[asyncpg.Record] = []
        else:
            rows = await conn.fetch(then_after(then.query), LOCK, wanted, *then.args)
            spaces, found = rows[0]["erased_workspaces"], rows[0]["erased_digests"]
            rows = [r for r in rows if r["then_row"]]
        erased = frozenset((w, bytes(d)) for w, d in zip(spaces, found, strict=True))
        return cls(key, erased, codes), rows

    def workspace(self, e: Envelope, workspace_id: str | None = None) -> str | None:
        """``e``'s workspace: its own, else ``workspace_id`` (the caller's), else its link's."""
        code = e.payload.get("code")
        return e.workspace_id or workspace_id or (self.codes.get(code) if isinstance(code, str) else None)

    def names(self, e: Envelope, workspace_id: str | None = None) -> bool:
        """Whether the ledger names ``e`` in its workspace (an event of no workspace: never).
        An event that names a customer is theirs (by identity): the ledger names it where it
        names that customer, never by a visitor or a click they share with an erased person
        (one browser, two sign-ups: docs/privacy.md)."""
        if not self.erased or (ws := self.workspace(e, workspace_id)) is None:
            return False
        x = e.payload.get("external_id")
        if isinstance(x, str) and x and not is_pseudonym(x):
            return (ws, digest(self.key, EXTERNAL, x, ws)) in self.erased
        return any((ws, d) in self.erased for d in digests_of(self.key, e, ws))

    def scrubbed(
        self, envelopes: list[Envelope], workspace_of: Mapping[int, str | None] | None = None
    ) -> list[tuple[Envelope, str | None]]:
        """Scrub, in place, each envelope the ledger names that still holds personal data; the
        originals, with their workspace (a replayed copy scrubbed before is not one)."""
        out = []
        for i, e in enumerate(envelopes):
            ws = self.workspace(e, (workspace_of or {}).get(id(e)))
            if self.names(e, ws) and (scrubbed := scrub(self.key, e, ws)) != e:
                envelopes[i] = scrubbed
                out.append((e, ws))
        return out


class LedgerUnavailable(Outage):
    """The ledger could not be read (Postgres away): whatever was to be checked waits."""


Check = Callable[[list[Envelope]], Awaitable[dict[int, Envelope]]]


# the pool whose ledger holds each event's workspace's, as indexes of the events by pool
# (``ingest.ledger.placement.Placement.by_pool``: an event of no workspace, its link code's)
ByPool = Callable[[list[Envelope]], Awaitable[dict[asyncpg.Pool, list[int]]]]


@asynccontextmanager
async def held(pool: asyncpg.Pool, by_pool: ByPool | None = None) -> AsyncIterator[Check]:
    """The ledger's check for a writer outside the workers (a spool's drain, an import): in
    a transaction holding the ledger's lock shared until the block ends, so that what the
    block appends is in Redis before an erasure's fence returns, and found by its sweep.
    With ``by_pool`` (workspaces on several shards), each envelope is checked against its own
    workspace's shard's ledger, whose lock is held there from the first such check to the
    block's end: an erasure is in the ledger of its workspace's shard alone.
    Raises ``LedgerUnavailable`` while Postgres is away."""
    held_on: dict[asyncpg.Pool, tuple[asyncpg.Connection, Any]] = {}

    async def on(p: asyncpg.Pool) -> asyncpg.Connection:
        if p in held_on:
            return held_on[p][0]
        try:
            conn = await p.acquire()
        except PG_ERRORS as exc:
            raise LedgerUnavailable(repr(exc)) from exc
        tr = conn.transaction()
        held_on[p] = (conn, tr)
        try:
            await tr.start()
        except Exception as exc:
            if not pg_unavailable(exc):
                raise
            raise LedgerUnavailable(repr(exc)) from exc
        return conn

    async def check(envelopes: list[Envelope]) -> dict[int, Envelope]:
        out: dict[int, Envelope] = {}
        try:
            parts = await by_pool(envelopes) if by_pool is not None else {pool: list(range(len(envelopes)))}
        except (*PG_ERRORS, asyncpg.PostgresError) as exc:  # the directory away
            raise LedgerUnavailable(repr(exc)) from exc
        for p, indexes in parts.items():
            conn = await on(p)
            part = [envelopes[i] for i in indexes]
            try:
                ledger = await Ledger.read(conn, part)
                named = [(i, e) for i, e in zip(indexes, part, strict=True) if ledger.names(e)]
                if named:  # what these teach the ledger (a spooled lead's click)
                    await learn(conn, ledger.key, [(e, ledger.workspace(e)) for _, e in named])
            except (*PG_ERRORS, asyncpg.PostgresError, fence.Moved) as exc:  # moved: its shard is another now
                raise LedgerUnavailable(repr(exc)) from exc
            out.update({i: scrub(ledger.key, e, ledger.workspace(e)) for i, e in named})
        return out

    try:
        await on(pool)
        try:
            yield check
        except BaseException:
            for _, tr in held_on.values():
                with contextlib.suppress(Exception):
                    await tr.rollback()
            raise
        for _, tr in held_on.values():
            try:
                await tr.commit()
            except Exception as exc:  # read-only, the session ended, the connection closed
                if not pg_unavailable(exc):
                    raise
                raise LedgerUnavailable(repr(exc)) from exc
    finally:
        for p, (conn, _) in held_on.items():
            try:
                await p.release(conn)
            except (*PG_ERRORS, asyncpg.InterfaceError):
                pass
