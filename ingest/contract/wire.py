"""The wire format: how an ``Envelope`` (``ingest.contract.events``) becomes a stream
entry's fields, and back.

A stream entry (wire version 3) is one field, ``v``, holding the envelope's values packed
after a fixed header (``_HEAD``, big-endian)::

    version (3, one byte), event_id (the UUID's 16 bytes), type (2 bytes), received_at
    (ms since the epoch, 8 bytes, signed), dialect (1 byte: ours by code,
    ``_DIALECT_CODES``; 0: its text follows), then the lengths of workspace_id, client_ip
    (2 bytes each), user_agent (4) and the dialect's text (2), then those four, then the
    payload to the end

    workspace_id  a UUID's 16 bytes, else marked text (``_workspace_bytes``); empty: none
    client_ip     text; empty: none
    user_agent    text with the common fragments of browsers' User-Agents as one byte each
                  (``_UA_TOKENS``: a Chrome UA's 105 bytes are 9); one holding a control
                  byte goes behind a NUL, verbatim; empty: none
    payload       compact JSON, its top-level keys that our routes write as one letter each
                  (``_PAYLOAD_KEYS``); any other key of at most one character, or starting
                  with "~", behind a "~"

One field, because Redis spends about half a microsecond on each argument a script is sent
and on each value it stores or reads back: version 2 held the same values as eight fields
(the names once per listpack node, integers as integers), and its 16 arguments were a
quarter of Redis's CPU for an append (``python -m bench.merged_scripts``).

Text that is empty, or starts with a NUL, is stored behind one NUL, so "" and None stay
apart. ``to_entry`` gives the field, ``from_entry`` reads version 3, version 2 (eight fixed
fields, in this order: ``i`` event_id's bytes, ``t`` type, ``w``, ``r`` received_at, ``a``,
``u``, ``d`` dialect code or text, ``p``, each value as version 3 holds it) and version 1,
which the edge wrote before: one field, ``e``, holding a positional JSON array::

    [1, event_id (32 hex), type, workspace_id | null, received_at (ms since epoch),
     client_ip | null, user_agent | null, dialect, payload]

Version 1 stays the one-blob form (``to_blob``/``from_blob``): what the edge's disk spool
keeps (its replay appends version 3), and what stream entries, spools, archive segments and
dead letters made before the upgrade hold.

Functions of this module, not methods of ``Envelope``: the envelope is what an event says,
whoever reads it; its bytes are this module's alone.
"""

from __future__ import annotations

import functools
import operator
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from ingest.contract.errors import Refused
from ingest.contract.events import Dialect, Envelope, EventType, uuid_of

WIRE_VERSION = 3  # the stream entry's layout: one packed field (the module doc)
BLOB_VERSION = 1  # the one-field JSON form, still read everywhere
FIELD = b"e"  # version 1's one field
FIELDS: tuple[bytes, ...] = (b"i", b"t", b"w", b"r", b"a", b"u", b"d", b"p")  # version 2, in order
PACKED = b"v"  # version 3's one field
_HEAD = struct.Struct(">B16sHqBHHIH")  # version, event id, type, received_at, dialect code, 4 lengths
_FIELDS_OF = operator.itemgetter(*FIELDS)  # an entry's eight values in one C call (a generator took 8)


class EnvelopeError(Refused, ValueError):
    """An entry that can never be decoded: permanent, dead-letter it."""


def to_blob(e: Envelope) -> bytes:
    """The version-1 blob (the spool's form; ``to_entry`` is what goes on a stream)."""
    # the payload one level down: within ``ingest.contract.bounds`` (every door checks
    # it) that is at most 33 levels, and orjson writes 255
    return orjson.dumps(
        [
            BLOB_VERSION,
            e.event_id.hex,
            int(e.type),
            e.workspace_id,
            e.received_at_ms,
            e.ip,
            e.user_agent,
            e.dialect,
            e.payload,
        ]
    )


def to_entry(e: Envelope) -> tuple[bytes, bytes]:
    """The version-3 stream field, as XADD's name/value arguments (``EnvelopeError`` for an
    address, workspace or dialect text past 65,535 bytes, or a received time or type out of
    range, which no door lets through). The payload keeps to
    ``ingest.contract.bounds`` (every door checks what the client sent), so orjson, which
    writes 255 levels, always writes it; an entry in a stream was written here once, so
    a rewrite of it (an erasure's scrub) is as deep as what orjson wrote already."""
    w = _workspace_bytes(e.workspace_id)
    a = _text(e.ip)
    u = _ua_bytes(e.user_agent)
    code = _DIALECT_CODES.get(e.dialect, 0)
    d = b"" if code else e.dialect.encode()
    try:
        head = _HEAD.pack(
            WIRE_VERSION, e.event_id.bytes, int(e.type), e.received_at_ms, code, len(w), len(a), len(u), len(d)
        )
    except struct.error as exc:  # no door lets such a value through (headers, ids, our dialects)
        raise EnvelopeError(f"not an entry: {exc}") from None
    p = orjson.dumps({_PAYLOAD_KEYS.get(k) or _escape_key(k): v for k, v in e.payload.items()})
    return PACKED, b"".join((head, w, a, u, d, p))


def to_entry_dict(e: Envelope) -> dict[bytes, bytes | int]:
    """``to_entry`` as the mapping redis-py's ``xadd`` takes."""
    f = to_entry(e)
    return dict(zip(f[::2], f[1::2], strict=True))


def from_entry(fields: Mapping[bytes, bytes]) -> Envelope:
    """The envelope of a stream entry (or a dead letter, or an archived entry): version
    3's ``v``, else version 2's fields, else version 1's ``e``."""
    packed = fields.get(PACKED)
    if packed is not None:
        return _from_packed(packed)
    try:
        i, t, w, r, a, u, d, p = _FIELDS_OF(fields)
    except KeyError:
        if FIELD in fields:
            return from_blob(fields[FIELD])
        if any(k in fields for k in FIELDS):
            raise EnvelopeError("an incomplete version-2 entry") from None
        raise EnvelopeError(
            f"no envelope: neither {PACKED.decode()!r} nor {FIELD.decode()!r} nor version-2 fields"
        ) from None
    try:
        if len(i) != 16:
            raise ValueError("event id: not 16 bytes")
        return _envelope(
            _uuid(i),
            _TYPES.get(t) or EventType(int(t)),
            w,
            int(r),
            a,
            u,
            _DIALECTS.get(d) or _str(_untext(d)),
            p,
        )
    except (TypeError, ValueError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(str(exc)) from None


def _from_packed(v: bytes) -> Envelope:
    try:
        version, i, t, r, code, nw, na, nu, nd = _HEAD.unpack_from(v)
        if version != WIRE_VERSION:
            raise ValueError(f"not a version-3 entry (version {version})")
        at = _HEAD.size
        w, a, u, d = v[at : at + nw], v[at + nw : at + nw + na], v[at + nw + na : at + nw + na + nu], b""
        at += nw + na + nu
        if not code:
            d = v[at : at + nd]
            at += nd
        if at > len(v):
            raise ValueError("a version-3 entry cut short")
        return _envelope(
            uuid_of(int.from_bytes(i)),
            _TYPES.get(t) or EventType(t),
            w,
            r,
            a,
            u,
            _DIALECTS[code] if code else _str(d.decode()),
            v[at:],
        )
    except (struct.error, KeyError, TypeError, ValueError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise EnvelopeError(str(exc) or type(exc).__name__) from None


def _envelope(event_id: uuid.UUID, t: EventType, w: bytes, r: int, a: bytes, u: bytes, d: str, p: bytes) -> Envelope:
    packed = _dict(orjson.loads(p))
    payload = {_LONG_KEYS.get(k) or (k[1:] if k[:1] == "~" else k): v for k, v in packed.items()}
    # positional, in the fields' order (type, dialect, payload, workspace_id, ip, user_agent,
    # event_id, received_at_ms): half the cost of a call by keyword, once an event
    return Envelope(t, d, payload, _workspace_str(w), _untext(a), _ua_str(u), event_id, r)


def from_blob(raw: bytes) -> Envelope:
    """A version-1 blob."""
    try:
        v = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(v, list) or not v or v[0] != BLOB_VERSION or len(v) != 9:
        raise EnvelopeError("not a version-1 envelope")
    _, eid, etype, ws, received, ip, ua, dialect, payload = v
    try:
        return Envelope(
            event_id=uuid.UUID(hex=_str(eid)),
            type=EventType(etype),
            workspace_id=_opt_str(ws),
            received_at_ms=_int(received),
            ip=_opt_str(ip),
            user_agent=_opt_str(ua),
            dialect=_str(dialect),
            payload=_dict(payload),
        )
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(str(exc)) from None


def entry_of(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The envelope's own fields among ``fields`` (a dead letter's, say): version 3's ``v``,
    version 2's, or version 1's ``e``; verbatim, to append again."""
    return {k: v for k, v in fields.items() if k in _ENVELOPE_FIELDS}


def entry_from_blob(raw: bytes) -> dict[bytes, bytes | int]:
    """The stream fields for a version-1 blob (a spooled envelope): version 3 when it
    decodes, else the blob as it was, for the worker to dead-letter."""
    try:
        return to_entry_dict(from_blob(raw))
    except EnvelopeError:
        return {FIELD: raw}


_ENVELOPE_FIELDS = frozenset((PACKED, FIELD, *FIELDS))
_TYPES: dict[bytes | int, EventType] = {str(int(t)).encode(): t for t in EventType}  # as Redis returns them
_TYPES.update({int(t): t for t in EventType})  # as version 3 holds them
_DIALECT_CODES: dict[str, int] = {
    Dialect.BIORE: 1,
    Dialect.BRICQS: 2,
    Dialect.AFFITOR: 3,
    Dialect.AFFIXO: 4,
    Dialect.REFPORT: 5,
    Dialect.REDIRECT: 6,
    Dialect.NATIVE: 7,
    Dialect.DUB: 8,
}  # never renumber: entries in streams, archives and dead letters hold these
_DIALECTS: dict[bytes | int, str] = {str(n).encode(): name for name, n in _DIALECT_CODES.items()}
_DIALECTS.update({n: name for name, n in _DIALECT_CODES.items()})  # ``entry_dict`` not through Redis


def _text(v: str | None) -> bytes:
    """Text as a field: None is empty; text that is empty, starts with a NUL or reads as
    one of our codes (a dialect's) is stored behind one NUL."""
    if v is None:
        return b""
    b = v.encode()
    if not b or b[0] == 0 or b in _DIALECTS:
        return b"\x00" + b
    return b


# never change one: stream entries, archives and dead letters hold these (a new key may take
# a free letter: entries written before cannot hold it)
_PAYLOAD_KEYS: dict[str, str] = {
    "code": "c",
    "click_id": "k",
    "visitor_id": "v",
    "match": "m",
    "referrer": "r",
    "page_url": "u",
    "page_title": "t",
    "session_id": "s",
    "screen_resolution": "x",
    "viewport_size": "y",
    "language": "l",
    "timezone": "z",
    "test_mode": "T",
    "name": "n",
    "external_id": "e",
    "email": "E",
    "customer_name": "N",
    "avatar": "a",
    "metadata": "M",
    "conversion_id": "C",
    "dedupe": "d",
}
_LONG_KEYS = {short: key for key, short in _PAYLOAD_KEYS.items()}


def _escape_key(k: str) -> str:
    return "~" + k if len(k) < 2 or k[0] == "~" else k


# never renumber nor change one: stream entries, archives and dead letters hold these codes
# (a new fragment may take a free code: entries written before cannot contain it). Control
# bytes, which a User-Agent header never carries; tab, newline and carriage return unused.
_UA_TOKENS: dict[int, bytes] = {
    0x01: b"Mozilla/5.0 (",
    0x02: b") AppleWebKit/537.36 (KHTML, like Gecko) Chrome/",
    0x03: b") AppleWebKit/605.1.15 (KHTML, like Gecko)",
    0x04: b" Safari/537.36",
    0x05: b"Windows NT 10.0; Win64; x64",
    0x06: b"Macintosh; Intel Mac OS X 10_15_7",
    0x07: b"iPhone; CPU iPhone OS ",
    0x08: b" like Mac OS X",
    0x0B: b" Mobile/15E148 Safari/604.1",
    0x0C: b" Safari/605.1.15",
    0x0E: b" Version/",
    0x0F: b"Linux; Android ",
    0x10: b" Mobile Safari/537.36",
    0x11: b"X11; Linux x86_64",
    0x12: b") Gecko/20100101 Firefox/",
    0x13: b"; rv:",
    0x14: b" Edg/",
    0x15: b".0.0.0",
    0x16: b"iPad; CPU OS ",
    0x17: b"Macintosh; Intel Mac OS X ",
    0x18: b" AppleWebKit/",
    0x19: b" (KHTML, like Gecko)",
    0x1A: b"Mozilla/5.0",
}
_UA_ENCODE = sorted(((s, bytes([c])) for c, s in _UA_TOKENS.items()), key=lambda t: -len(t[0]))  # longest first
_UA_DECODE = [(bytes([c]), s) for c, s in _UA_TOKENS.items()]
_CONTROL = bytes(range(32))


@functools.lru_cache(maxsize=1024)  # a few User-Agents make most of the traffic (≤ 2 MB held)
def _ua_bytes(v: str | None) -> bytes:
    if v is None:
        return b""
    b = v.encode()
    if not b or b.translate(None, _CONTROL) != b:
        return b"\x00" + b
    for fragment, code in _UA_ENCODE:
        if fragment in b:
            b = b.replace(fragment, code)
    return b


@functools.lru_cache(maxsize=1024)
def _ua_str(v: bytes) -> str | None:
    if not v:
        return None
    if v[0] == 0:
        return v[1:].decode()
    if v.translate(None, _CONTROL) != v:
        for code, fragment in _UA_DECODE:
            v = v.replace(code, fragment)
    return v.decode()


def _untext(v: bytes) -> str | None:
    if not v:
        return None
    return (v[1:] if v[0] == 0 else v).decode()


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(v: str | None) -> bytes:
    """A workspace id in its canonical UUID form as its 16 bytes; None as nothing; other
    text behind a marker, never 16 bytes long: NUL + text, or 0x01 + text + 0x01 when that
    would be 16."""
    if v is None:
        return b""
    if len(v) == 36:
        try:
            u = uuid.UUID(v)
        except ValueError:
            pass
        else:
            if str(u) == v:
                return u.bytes
    b = v.encode()
    return b"\x01" + b + b"\x01" if len(b) == 15 else b"\x00" + b


@functools.lru_cache(maxsize=4096)
def _workspace_str(v: bytes) -> str | None:
    if len(v) == 16:
        return str(uuid.UUID(bytes=v))
    if not v:
        return None
    if v[0] == 0:
        return v[1:].decode()
    if v[0] == 1 and len(v) == 17 and v[-1] == 1:
        return v[1:-1].decode()
    raise ValueError("workspace id: not a UUID nor marked text")


def _uuid(b: bytes) -> uuid.UUID:
    """``uuid.UUID(bytes=b)`` for 16 bytes, at half its cost (``events.uuid_of``): the
    worker decodes an event id per entry, and ``UUID.__init__`` was a quarter of
    ``from_entry``."""
    if len(b) != 16:  # as ``UUID(bytes=)`` refuses it: a damaged entry is poison, never another id
        raise ValueError("an event id is 16 bytes")
    return uuid_of(int.from_bytes(b))


def _opt_str(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise TypeError(f"expected a string, got {type(v).__name__}")


def _str(v: object) -> str:
    if isinstance(v, str):
        return v
    raise TypeError(f"expected a string, got {type(v).__name__}")


def _int(v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise TypeError(f"expected an integer, got {type(v).__name__}")


def _dict(v: object) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    raise TypeError(f"expected an object, got {type(v).__name__}")
