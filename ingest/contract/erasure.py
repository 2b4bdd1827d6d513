"""Erasure: the ledger of erased people, and what an event of one looks like once scrubbed.

An erasure (``refstream erase``, ``DELETE /v1/customers/{external_id}``) first writes the
ledger: keyed digests (BLAKE2b under a random salt kept in the database) of the
person's external id, visitor ids and click ids, never the values themselves. From its
commit on, every event of the person that reaches a writer is scrubbed before it is
stored or appended: by the workers (``workers.consumer.store``, and so by a replay, which
stores through it), by an edge's spool drain, by an import. Every batch reads the ledger holding an
advisory lock shared until it commits; an erasure, its ledger committed, takes the lock
exclusive once, and so waits out every batch that read the ledger before; only then does
it scrub what is stored.

Scrubbing is the same function everywhere (``scrub``): the visitor's IP and User-Agent go,
so do the payload's contact and browsing fields (``PERSONAL``), and the external and
visitor ids become pseudonyms (``pseudonym``) that are a function of their digest. The
function makes every copy of an event the same scrubbed event, wherever and whenever it
is met: a replayed lead keeps its dedupe key (``lead`` + pseudonym + name), a later sale
of the person attributes to their scrubbed lead, a later click of an erased visitor is not
a new unique visitor. Counters never move for an erasure: it changes who, never how many.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from ingest.contract import clicks, copies
from ingest.contract.connections import PG_ERRORS, pg_unavailable
from ingest.contract.errors import Outage
from ingest.contract.events import Envelope, EventType

# pg_advisory_xact_lock key: an erasure's ledger write takes it exclusive, a batch shared
LOCK = 0x72_65_66_65_72_61_73_65  # "referase"

EXTERNAL = "x"  # a customer's external id, per workspace
VISITOR = "v"  # a visitor id (a click id, a tracker's visitor id, a referred session)
EVENT = "i"  # the id of one of the person's events (a click a lead named)
PREFIX = "erased-"

# the payload's fields that describe a person or their browser; an erased person's are removed
PERSONAL = frozenset(
    {
        "email",
        "customer_name",
        "avatar",
        "referrer",
        "page_url",
        "page_title",
        "metadata",
        "session_id",
        "screen_resolution",
        "viewport_size",
        "language",
        "timezone",
    }
)
# an enrichment's fields that the IP or the browser's build told, kept as None once erased
ENRICHMENT_PERSONAL = ("ip", "asn", "as_name", "city", "region", "latitude", "longitude")

_salt: bytes | None = None
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


async def salt(conn: asyncpg.Connection) -> bytes:
    """The ledger's key: made at random by the migration (schema.sql), once per database."""
    global _salt
    if _salt is None:
        found = await conn.fetchval("SELECT salt FROM erasure_salt")
        if found is None:
            raise RuntimeError("erasure_salt is empty: run `refstream migrate`")
        _salt = bytes(found)
    return _salt


def known_salt() -> bytes | None:
    """The salt, where this process has read it already (``salt``): for a writer that files
    what an erasure must reach without a round trip to Postgres (``erasure_index``)."""
    return _salt


def forget_salt() -> None:
    """For a process that moves to another database (a test harness checking one seed's
    database after another's): the salt is cached for the process's one database."""
    global _salt
    _salt = None


def digest(key: bytes, kind: str, value: str, workspace_id: str | None = None) -> bytes:
    """The ledger's entry for one identifier: keyed BLAKE2b (a MAC, and a few hundred
    nanoseconds: the workers take one per identifier of every event). An external id's
    digest is one per workspace; a visitor's or a click's is the same in every workspace
    (so a pseudonym made before the ledger was per workspace stays what it was), and the
    ledger holds it per workspace (``erased_ids.workspace_id``): a client chooses those
    ids, and two workspaces' clients may choose alike."""
    scope = (workspace_id or "") if kind == EXTERNAL else ""
    h = _keyed(key).copy()
    h.update(f"{kind}\x1f{scope}\x1f{value}".encode())
    return h.digest()


_KEYED: dict[bytes, hashlib.blake2b] = {}  # key -> a BLAKE2b state with the key taken in


def _keyed(key: bytes) -> hashlib.blake2b:
    """A copy of the keyed state gives the digest ``blake2b(data, key=key)`` does, without
    compressing the key's block again: a third less a digest, and a worker takes one or
    more of every event (``_digests``)."""
    h = _KEYED.get(key)
    if h is None:
        if len(_KEYED) >= 16:  # a process holds one database's salt (a test harness, a few)
            _KEYED.clear()
        h = _KEYED[key] = hashlib.blake2b(key=key, digest_size=16)
    return h


def pseudonym(key: bytes, kind: str, value: str, workspace_id: str | None = None) -> str:
    """What an identifier of an erased person becomes: the same for every copy of it, and
    nothing that leads back to it without the salt and a guess."""
    return pseudonym_of(key, digest(key, kind, value, workspace_id))


def pseudonym_of(key: bytes, d: bytes) -> str:
    """The pseudonym of the identifier whose ledger digest is ``d``: what the ledger's entry
    names in the scrubbed rows (the sweep finds a person's rows by it)."""
    return PREFIX + hashlib.blake2b(d, key=key, digest_size=8, person=b"pseudonym").hexdigest()


def is_pseudonym(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX) and len(value) == len(PREFIX) + 16


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
                asked += [(d, ws) for d in _digests(key, e, ws)]
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
        return any((ws, d) in self.erased for d in _digests(self.key, e, ws))

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


def digests_of(key: bytes, e: Envelope, workspace_id: str | None) -> list[bytes]:
    """The ledger's digests of what ``e`` names (its id, its customer's, its visitor's, the
    click it names), in ``workspace_id``'s terms where ``e`` has no workspace of its own."""
    return _digests(key, e, workspace_id)


def _digests(key: bytes, e: Envelope, workspace_id: str | None) -> list[bytes]:
    p = e.payload
    out = [digest(key, EVENT, e.event_id.hex)]
    if isinstance(x := p.get("external_id"), str) and not is_pseudonym(x):
        out.append(digest(key, EXTERNAL, x, e.workspace_id or workspace_id))
    if isinstance(v := p.get("visitor_id"), str) and not is_pseudonym(v):
        out.append(digest(key, VISITOR, v))
    if isinstance(c := p.get("click_id"), str) and (cid := clicks.parse(c)) is not None:
        out.append(digest(key, EVENT, cid.hex))
    return out


def scrub(key: bytes, e: Envelope, workspace_id: str | None = None) -> Envelope:
    """``e`` without its person: no IP, no User-Agent, no contact or browsing fields, ids
    as pseudonyms. The event id, type, link, time and amounts stay: it still counts."""
    ws = e.workspace_id or workspace_id
    payload: dict[str, Any] = {k: v for k, v in e.payload.items() if k not in PERSONAL}
    x = payload.get("external_id")
    if isinstance(x, str) and not is_pseudonym(x):
        payload["external_id"] = pseudonym(key, EXTERNAL, x, ws)
    v = payload.get("visitor_id")
    if isinstance(v, str) and not is_pseudonym(v):
        payload["visitor_id"] = pseudonym(key, VISITOR, v)
        d = payload.get("dedupe")
        if isinstance(d, str) and d.endswith(":" + v):  # a conversion's: code and referred session
            payload["dedupe"] = d[: -len(v)] + payload["visitor_id"]
    return Envelope(e.type, e.dialect, payload, e.workspace_id, None, None, e.event_id, e.received_at_ms)


class LedgerUnavailable(Outage):
    """The ledger could not be read (Postgres away): whatever was to be checked waits."""


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
    for e, ws in originals:
        ws = e.workspace_id or ws
        if ws is None:
            continue  # no workspace, no ledger names it
        found = await conn.fetchval(
            "SELECT erasure_id FROM erased_ids WHERE digest = ANY($1::bytea[]) AND workspace_id = $2 LIMIT 1",
            _digests(key, e, ws),
            ws,
        )
        if found is None:
            continue
        more = []
        v = e.payload.get("visitor_id")
        visitor = v if isinstance(v, str) and v and not is_pseudonym(v) else None
        cid = clicks.parse(c) if isinstance(c := e.payload.get("click_id"), str) else None
        if visitor is not None or cid is not None:
            # what another customer holds too (a browser two signed up from) is not theirs alone
            x = e.payload.get("external_id")
            own = x if isinstance(x, str) and not is_pseudonym(x) else None
            held_v, held_c = await held_by_others(
                conn, key, ws, own, [visitor] if visitor else [], [cid] if cid is not None else []
            )
            if visitor is not None and visitor not in held_v:
                more.append((digest(key, VISITOR, visitor), VISITOR))
            if cid is not None and cid not in held_c:
                more.append((digest(key, EVENT, cid.hex), EVENT))
                # the row that holds its key, where the click is a copy (``copies``)
                for stored in (await copies.stored_as(conn, ws, int(EventType.CLICK), [cid])).values():
                    more.append((digest(key, EVENT, stored.hex), EVENT))
        at = first_ms(e.received_at_ms, [cid] if cid is not None else [])
        assert at is not None
        touched[found] = min(touched.get(found, at), at)
        if more and await conn.fetch(_LEARN, found, [d for d, _ in more], [k for _, k in more], ws):
            joined.add(found)
    for erasure_id, ms in sorted(touched.items(), key=lambda t: str(t[0])):
        if met or erasure_id in joined:
            await conn.execute(_AGAIN, erasure_id, datetime.fromtimestamp(ms / 1000, UTC))
    return bool(joined)


Check = Callable[[list[Envelope]], Awaitable[dict[int, Envelope]]]


@asynccontextmanager
async def held(pool: asyncpg.Pool) -> AsyncIterator[Check]:
    """The ledger's check for a writer outside the workers (a spool's drain, an import): in
    a transaction holding the ledger's lock shared until the block ends, so that what the
    block appends is in Redis before an erasure's fence returns, and found by its sweep.
    Raises ``LedgerUnavailable`` while Postgres is away."""
    try:
        conn = await pool.acquire()
    except PG_ERRORS as exc:
        raise LedgerUnavailable(repr(exc)) from exc
    tr = conn.transaction()
    try:
        try:
            await tr.start()
        except Exception as exc:
            if not pg_unavailable(exc):
                raise
            raise LedgerUnavailable(repr(exc)) from exc

        async def check(envelopes: list[Envelope]) -> dict[int, Envelope]:
            try:
                ledger = await Ledger.read(conn, envelopes)
                named = [(i, e) for i, e in enumerate(envelopes) if ledger.names(e)]
                if named:  # what these teach the ledger (a spooled lead's click)
                    await learn(conn, ledger.key, [(e, ledger.workspace(e)) for _, e in named])
            except (*PG_ERRORS, asyncpg.PostgresError) as exc:
                raise LedgerUnavailable(repr(exc)) from exc
            return {i: scrub(ledger.key, e, ledger.workspace(e)) for i, e in named}

        try:
            yield check
        except BaseException:
            with contextlib.suppress(Exception):
                await tr.rollback()
            raise
        try:
            await tr.commit()
        except Exception as exc:  # read-only, the session ended, the connection closed
            if not pg_unavailable(exc):
                raise
            raise LedgerUnavailable(repr(exc)) from exc
    finally:
        try:
            await pool.release(conn)
        except (*PG_ERRORS, asyncpg.InterfaceError):
            pass


def _changed(before: Envelope, after: Envelope) -> dict[str, str | None]:
    """What ``after`` (the scrub of ``before``) took out: each value, and what it became."""
    values: dict[str, str | None] = {v: None for v in (before.ip, before.user_agent) if v}
    for k, v in before.payload.items():
        if isinstance(v, str) and v and after.payload.get(k) != v:
            values[v] = after.payload.get(k) if isinstance(after.payload.get(k), str) else None
    return values


def scrub_commands(commands: Iterable[tuple[Any, ...]], before: Envelope, after: Envelope) -> list[tuple[Any, ...]]:
    """An event's extra commands (a spooled click's cache entry, an Affixo fingerprint's
    visitor: ``ingest.spool``) fit for ``after``, the scrub of ``before``: a JSON argument
    (the click cache's entry) has the values the scrub took out as they became (the visitor
    as its pseudonym); a command holding one of them bare (the fingerprint cache, which would
    hand the erased visitor to the next click) is not sent."""
    values = _changed(before, after)
    out = []
    for command in commands:
        args: list[Any] = []
        for a in command:
            text = a.decode(errors="replace") if isinstance(a, bytes) else a
            if isinstance(text, str) and text in values:
                break
            if isinstance(a, bytes | str) and text[:1] in ("{", "["):
                try:
                    doc = orjson.loads(a)
                except orjson.JSONDecodeError:
                    args.append(a)
                    continue
                new = orjson.dumps(redact(doc, values))
                args.append(new if isinstance(a, bytes) else new.decode())
                continue
            args.append(a)
        else:
            out.append(tuple(args))
    return out


def scrub_answer(answer: bytes, before: Envelope, after: Envelope) -> bytes:
    """An idempotency answer (fingerprint, status, JSON body: ``ingest.edge.idempotency``)
    for ``before``, without what its scrub (``after``) took out: a repeat of the request
    is still answered, and appends nothing."""
    head, body = answer[:35], answer[35:]
    ids = {v: new for v, new in _changed(before, after).items() if isinstance(new, str)}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return answer
    # the answer is the event's, the person's (their fields go, by identity: never another
    # string equal to one of theirs); as deep as the answer orjson wrote at the edge
    return head + orjson.dumps(redact_person(doc, ids, hers=True))


# A person's fields in a document about their event (a webhook payload, fraud evidence, an
# idempotency answer), by identity: where they sit, never a string equal to one of theirs
# elsewhere (an invoice id equal to their customer id, a customer named as the affiliate).
# Their ids (each becomes its pseudonym where it is one of theirs) ...
PERSON_IDS = frozenset(
    {
        "external_id",
        "externalId",
        "customer_external_id",
        "customerExternalId",
        "customer_id",
        "customerId",
        "visitor_id",
        "visitorId",
        "referred_session_id",
    }
)
# ... the event's own data about them (each goes) ...
PERSON_DATA = PERSONAL | {
    "ip",
    "user_agent",
    "agent",
    "phone",
    "address",
    "avatar_url",
    "customer_email",
    "customerEmail",
    "customerName",
    "customerAvatar",
}
# ... their customer object's (a name there is theirs) ...
CUSTOMER_DATA = PERSON_DATA | {"name"}
# ... and the objects that are someone else's, whoever's event holds them: the link, its
# affiliate, its program (an affiliate's fields beside a customer's, a self-referral's
# ``affiliate_email``, are the affiliate's: their own erasure takes them)
OTHERS = frozenset({"link", "affiliate", "partner", "program", "milestone"})


def redact_person(doc: Any, ids: Mapping[str, str], *, hers: bool = False) -> Any:
    """A JSON document without the person whose ids (raw, to their pseudonyms) are ``ids``,
    by identity: an object that names them in one of its id fields (``PERSON_IDS``, its
    ``customer`` object), or every object of ``doc`` when ``hers`` (a webhook payload or
    fraud evidence of the person's own event), has those ids as their pseudonyms and its
    ``PERSON_DATA`` emptied, and its ``customer`` object the person's: every id of theirs
    a pseudonym, its ``CUSTOMER_DATA`` emptied. The link's, the affiliate's and the
    program's objects (``OTHERS``) are never the person's. In a list, each item is its own
    (a batch's answer holds other people's items) unless the whole is ``hers``."""
    if isinstance(doc, list):
        return [redact_person(v, ids, hers=hers) for v in doc]
    if not isinstance(doc, dict):
        return doc
    hers = hers or _names_person(doc, ids)
    if not hers:
        return {k: v if k in OTHERS else redact_person(v, ids) for k, v in doc.items()}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k in OTHERS:
            out[k] = v
        elif k in PERSON_IDS and isinstance(v, str) and v in ids:
            out[k] = ids[v]
        elif k == "customer" and isinstance(v, dict):
            out[k] = {
                f: ids[x] if isinstance(x, str) and x in ids else None if f in CUSTOMER_DATA else x
                for f, x in v.items()
            }
        elif k in PERSON_DATA:
            out[k] = None
        else:
            out[k] = redact_person(v, ids, hers=True)
    return out


def _names_person(doc: dict[str, Any], ids: Mapping[str, str]) -> bool:
    """``doc`` (an object, and its objects but its lists' and ``OTHERS``) names the person
    in an id field of its own or anywhere in its ``customer`` object."""
    for k, v in doc.items():
        if k in OTHERS:
            continue
        if k in PERSON_IDS and isinstance(v, str) and v in ids:
            return True
        if isinstance(v, dict):
            if k == "customer" and any(isinstance(x, str) and x in ids for x in v.values()):
                return True
            if _names_person(v, ids):
                return True
    return False


def redact(doc: Any, values: Mapping[str, str | None]) -> Any:
    """A JSON document with every string that is a key of ``values`` replaced by its value
    (a pseudonym, or None), at any depth (webhook payloads, fraud evidence, answers)."""
    if isinstance(doc, str):
        return values.get(doc, doc) if doc in values else doc
    if isinstance(doc, list):
        return [redact(v, values) for v in doc]
    if isinstance(doc, dict):
        return {k: redact(v, values) for k, v in doc.items()}
    return doc
