"""Stream entries in the forms the edge wrote before, and entries with their payload
replaced (deeper than any door lets through, or not JSON): what a backlog from an older
edge, an import or the archive may hold (``ingest.contract.wire``)."""

from __future__ import annotations

import uuid

import orjson

from ingest.contract import wire
from ingest.contract.events import Envelope


def _own_payload(e: Envelope) -> bytes:
    """``e``'s payload as an entry holds it (our keys as one letter; no key here needs ``~``)."""
    return orjson.dumps({wire._PAYLOAD_KEYS.get(k, k): v for k, v in e.payload.items()})


def v3_with(e: Envelope, payload: bytes) -> dict[bytes, bytes]:
    """``e``'s entry (version 3) with ``payload``'s bytes for its own (the payload ends it)."""
    name, packed = wire.to_entry(e)
    own = _own_payload(e)
    assert packed.endswith(own)
    return {name: packed[: -len(own)] + payload}


def v2_of(e: Envelope, payload: bytes | None = None) -> dict[bytes, bytes]:
    """``e`` as an edge before version 3 wrote it (eight fields, as Redis returns them), with
    ``payload``'s bytes for its own when given. Our dialects and a UUID workspace only."""
    return {
        b"i": e.event_id.bytes,
        b"t": str(int(e.type)).encode(),
        b"w": uuid.UUID(e.workspace_id).bytes if e.workspace_id else b"",
        b"r": str(e.received_at_ms).encode(),
        b"a": (e.ip or "").encode(),
        b"u": (e.user_agent or "").encode(),
        b"d": str(wire._DIALECT_CODES[e.dialect]).encode(),
        b"p": _own_payload(e) if payload is None else payload,
    }
