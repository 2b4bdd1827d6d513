"""The erasure ledger's identifiers (``ingest.contract.erasure``): the keyed digest of an
identifier (``digest``) under the database's salt (``salt``), the pseudonym it becomes
(``pseudonym``), and an event scrubbed of its person (``scrub``)."""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg

from ingest.contract import clicks
from ingest.contract.events import Envelope

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
    more of every event (``digests_of``)."""
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


def digests_of(key: bytes, e: Envelope, workspace_id: str | None) -> list[bytes]:
    """The ledger's digests of what ``e`` names (its id, its customer's, its visitor's, the
    click it names), in ``workspace_id``'s terms where ``e`` has no workspace of its own."""
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
