"""The wire contract: the event envelope that goes onto a stream.

Workers import this module; the edge owns it. An envelope is one stream field, ``e``,
holding a positional JSON array, because every byte is multiplied by the backlog::

    [version, event_id (32 hex), type, workspace_id | null, received_at (ms since epoch),
     client_ip | null, user_agent | null, dialect, payload]

The event id is a UUIDv7 minted at the edge: the idempotency key of the whole pipeline
(never the stream id, which changes when an entry is replayed or requeued).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import orjson

WIRE_VERSION = 1
FIELD = b"e"


class EventType(IntEnum):
    CLICK = 1
    LEAD = 2
    CONVERSION = 3


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


def uuid7(ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix ms timestamp, then 74 random bits."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
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
    received_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def encode(self) -> bytes:
        return orjson.dumps(
            [
                WIRE_VERSION,
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

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        try:
            v = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"not JSON: {exc}") from None
        if not isinstance(v, list) or not v or v[0] != WIRE_VERSION or len(v) != 9:
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
