"""The event envelope: what one event says, as the edge makes it and every reader gets it
back, and the ids it carries.

Workers import this module; the edge owns it. How an envelope becomes a stream entry's
fields, and back, is ``ingest.contract.wire``.

The event id is a UUIDv7 minted at the edge: the idempotency key of the whole pipeline
(never the stream id, which changes when an entry is replayed or requeued).
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ingest.contract import clock


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
    DUB = "dub"  # Dub's tracking API: POST /track/click, /track/lead, /track/sale


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
    return uuid_of(value)


def uuid_of(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` for a 128-bit ``value``, at a quarter of its cost (an edge
    mints an id a request, a worker decodes one an entry, and ``UUID.__init__`` is pure
    Python checking five ways to be called): it sets what ``__init__`` sets (``int``,
    ``is_safe``, the class's slots), so the value compares, hashes, prints and pickles as
    one made by it. The caller keeps ``value`` within 128 bits."""
    u = object.__new__(uuid.UUID)
    object.__setattr__(u, "int", value)
    object.__setattr__(u, "is_safe", _UNKNOWN_SAFETY)
    return u


_UNKNOWN_SAFETY = uuid.SafeUUID.unknown  # an enum member's lookup costs as much as the rest


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
