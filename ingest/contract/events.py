"""The wire contract: the event envelope that goes onto a stream.

Workers import this module; the edge owns it. Every byte is multiplied by the backlog, so
a stream entry (wire version 2) is eight fixed fields, always the same names in the same
order: Redis stores the names once per listpack node (entries that share the node's
master fields carry only their values) and integers as integers::

    i  event_id, the UUID's 16 bytes
    t  type (an integer)
    w  workspace_id: a UUID's 16 bytes, else marked text (``_workspace_bytes``); empty: none
    r  received_at, ms since the epoch (an integer)
    a  client_ip          (text; empty: none)
    u  user_agent: text with the common fragments of browsers' User-Agents as one byte
       each (``_UA_TOKENS``: a Chrome UA's 105 bytes are 9); one holding a control byte
       goes behind a NUL, verbatim; empty: none
    d  dialect: a small integer for ours (``_DIALECT_CODES``), else its text
    p  payload, compact JSON, its top-level keys that our routes write as one letter each
       (``_PAYLOAD_KEYS``); any other key of at most one character, or starting with
       "~", behind a "~"

Text that is empty, or starts with a NUL, is stored behind one NUL, so "" and None stay
apart. ``Envelope.entry`` gives the fields, ``Envelope.from_entry`` reads version 2 and
version 1, which the edge wrote before: one field, ``e``, holding a positional JSON array::

    [1, event_id (32 hex), type, workspace_id | null, received_at (ms since epoch),
     client_ip | null, user_agent | null, dialect, payload]

Version 1 stays the one-blob form (``encode``/``decode``): what the edge's disk spool keeps
(its replay appends version 2), and what stream entries, spools, archive segments and dead
letters made before the upgrade hold.

The event id is a UUIDv7 minted at the edge: the idempotency key of the whole pipeline
(never the stream id, which changes when an entry is replayed or requeued).
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import orjson

from ingest.contract import clock

WIRE_VERSION = 2  # the stream entry's layout: fixed fields (the module doc)
BLOB_VERSION = 1  # the one-field JSON form, still read everywhere
FIELD = b"e"  # version 1's one field
FIELDS: tuple[bytes, ...] = (b"i", b"t", b"w", b"r", b"a", b"u", b"d", b"p")  # version 2, in order


class EventType(IntEnum):
    CLICK = 1
    LEAD = 2
    CONVERSION = 3
    SALE = 4  # stored in `sales`, not `events` (workers/consumer/sales.py)
    # recorded by the edge in `refunds` (ingest/ledger/refunds.py); its stream copy is what
    # the archive and a replay carry, restored once by its key (workers/consumer/refunds.py)
    REFUND = 5


class Dialect:
    """Which API an event came in through (one per seed document, plus our own)."""

    BIORE = "biore"  # seed 000
    BRICQS = "bricqs"  # seed 001
    AFFITOR = "affitor"  # seed 002
    AFFIXO = "affixo"  # seed 003
    REFPORT = "refport"  # seed 004
    REDIRECT = "redirect"  # GET /r/{code}, a browser following a link
    NATIVE = "native"  # POST /v1/events/batch


class EnvelopeError(ValueError):
    """An entry that can never be decoded: permanent, dead-letter it."""


class _Entropy:
    """os.urandom drawn a page at a time: the same CSPRNG bytes, one syscall per 4 KiB
    rather than one per id (an edge mints two or three ids per request). A forked child
    starts with an empty page, never its parent's."""

    def __init__(self, page: int = 4096) -> None:
        self._page = page
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buf, self._pos, self._lock = b"", 0, threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:  # threads (asyncio.to_thread, a thread pool) must never share bytes
            pos = self._pos
            if pos + n > len(self._buf):
                self._buf, pos = os.urandom(self._page), 0
            self._pos = pos + n
            return self._buf[pos : pos + n]


_entropy = _Entropy()
random_bytes = _entropy.take


def sale_routing_key(workspace_id: str | None, by: str, value: str) -> str:
    """A sale's routing key, by its invoice or its customer: never a link code (codes cannot
    hold the unit separator)."""
    return f"sale\x1f{workspace_id or ''}\x1f{by}\x1f{value}"


def uuid7(ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix ms timestamp, then 74 random bits."""
    if ms is None:
        ms = clock.now_ms()
    rand = int.from_bytes(random_bytes(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 64) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b
    return uuid.UUID(int=value)


def unique_token() -> str:
    """128 random bits as 32 hex digits (request ids, rate-limit members)."""
    return random_bytes(16).hex()


@dataclass(slots=True)
class Envelope:
    type: EventType
    dialect: str
    payload: dict[str, Any]
    workspace_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    event_id: uuid.UUID = field(default_factory=uuid7)
    received_at_ms: int = field(default_factory=clock.now_ms)

    def encode(self) -> bytes:
        """The version-1 blob (the spool's form; ``entry`` is what goes on a stream)."""
        # the payload one level down: within ``ingest.contract.bounds`` (every door checks
        # it) that is at most 33 levels, and orjson writes 255
        return orjson.dumps(
            [
                BLOB_VERSION,
                self.event_id.hex,
                int(self.type),
                self.workspace_id,
                self.received_at_ms,
                self.ip,
                self.user_agent,
                self.dialect,
                self.payload,
            ]
        )

    def routing_key(self) -> str | None:
        """What the event's partition follows (``Keys.partition_for``): its link's code, so
        one link's events stay in order; a sale's invoice, so every copy of one invoice (and
        its idempotency record) meets in one partition whatever else it says, else its
        customer; a refund's sale's invoice. None: neither is known."""
        if self.type is EventType.REFUND:  # beside its sale: a replay restores the sale first
            invoice = self.payload.get("invoice")
            return sale_routing_key(self.workspace_id, "invoice", invoice) if isinstance(invoice, str) else None
        if self.type is EventType.SALE:
            invoice, customer = self.payload.get("invoice"), self.payload.get("external_id")
            if isinstance(invoice, str):
                return sale_routing_key(self.workspace_id, "invoice", invoice)
            return sale_routing_key(self.workspace_id, "customer", customer) if isinstance(customer, str) else None
        code = self.payload.get("code")
        return code if isinstance(code, str) else None

    def entry(self) -> tuple[bytes | int, ...]:
        """The version-2 stream fields, as XADD's name/value arguments. The payload keeps to
        ``ingest.contract.bounds`` (every door checks what the client sent), so orjson, which
        writes 255 levels, always writes it; an entry in a stream was written here once, so
        a rewrite of it (an erasure's scrub) is as deep as what orjson wrote already."""
        return (
            b"i", self.event_id.bytes,
            b"t", int(self.type),
            b"w", _workspace_bytes(self.workspace_id),
            b"r", self.received_at_ms,
            b"a", _text(self.ip),
            b"u", _ua_bytes(self.user_agent),
            b"d", _DIALECT_CODES.get(self.dialect) or _text(self.dialect),
            b"p", orjson.dumps({_PAYLOAD_KEYS.get(k) or _escape_key(k): v for k, v in self.payload.items()}),
        )  # fmt: skip

    def entry_dict(self) -> dict[bytes, bytes | int]:
        """``entry`` as the mapping redis-py's ``xadd`` takes."""
        f = self.entry()
        return dict(zip(f[::2], f[1::2], strict=True))  # type: ignore[arg-type]

    @classmethod
    def from_entry(cls, fields: Mapping[bytes, bytes]) -> Envelope:
        """The envelope of a stream entry (or a dead letter, or an archived entry): version
        2's fields, else version 1's ``e``."""
        try:
            i, t, w, r, a, u, d, p = (fields[k] for k in FIELDS)
        except KeyError:
            if FIELD in fields:
                return cls.decode(fields[FIELD])
            if any(k in fields for k in FIELDS):
                raise EnvelopeError("an incomplete version-2 entry") from None
            raise EnvelopeError(f"no envelope: neither {FIELD.decode()!r} nor version-2 fields") from None
        try:
            if len(i) != 16:
                raise ValueError("event id: not 16 bytes")
            packed = _dict(orjson.loads(p))
            payload = {_LONG_KEYS.get(k) or (k[1:] if k[:1] == "~" else k): v for k, v in packed.items()}
            return cls(
                event_id=uuid.UUID(bytes=i),
                type=_TYPES.get(t) or EventType(int(t)),
                workspace_id=_workspace_str(w),
                received_at_ms=int(r),
                ip=_untext(a),
                user_agent=_ua_str(u),
                dialect=_DIALECTS.get(d) or _str(_untext(d)),
                payload=payload,
            )
        except (TypeError, ValueError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
            raise EnvelopeError(str(exc)) from None

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        """A version-1 blob."""
        try:
            v = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"not JSON: {exc}") from None
        if not isinstance(v, list) or not v or v[0] != BLOB_VERSION or len(v) != 9:
            raise EnvelopeError("not a version-1 envelope")
        _, eid, etype, ws, received, ip, ua, dialect, payload = v
        try:
            return cls(
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
    """The envelope's own fields among ``fields`` (a dead letter's, say): version 2's, or
    version 1's ``e``; verbatim, to append again."""
    return {k: v for k, v in fields.items() if k in _ENVELOPE_FIELDS}


def entry_from_blob(raw: bytes) -> dict[bytes, bytes | int]:
    """The stream fields for a version-1 blob (a spooled envelope): version 2 when it
    decodes, else the blob as it was, for the worker to dead-letter."""
    try:
        return Envelope.decode(raw).entry_dict()
    except EnvelopeError:
        return {FIELD: raw}


_ENVELOPE_FIELDS = frozenset((FIELD, *FIELDS))
_TYPES: dict[bytes | int, EventType] = {str(int(t)).encode(): t for t in EventType}  # as Redis returns them
_DIALECT_CODES: dict[str, int] = {
    Dialect.BIORE: 1, Dialect.BRICQS: 2, Dialect.AFFITOR: 3, Dialect.AFFIXO: 4, Dialect.REFPORT: 5,
    Dialect.REDIRECT: 6, Dialect.NATIVE: 7,
}  # fmt: skip  # never renumber: entries in streams, archives and dead letters hold these
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
    "code": "c", "click_id": "k", "visitor_id": "v", "match": "m", "referrer": "r", "page_url": "u",
    "page_title": "t", "session_id": "s", "screen_resolution": "x", "viewport_size": "y", "language": "l",
    "timezone": "z", "test_mode": "T", "name": "n", "external_id": "e", "email": "E", "customer_name": "N",
    "avatar": "a", "metadata": "M", "conversion_id": "C", "dedupe": "d",
}  # fmt: skip
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
