"""Dead letters: list, show, requeue and drop what the pipeline set aside in ``{prefix}:dead``.

A dead letter carries the fields the pipeline wrote (``stream``, ``id``, ``error``,
``deliveries``, ``at``) and the original entry's envelope fields verbatim, as read from its
stream: version 3's ``v``, version 2's (``ingest.contract.wire.FIELDS``), or version 1's ``e`` (entries and
letters from before the upgrade; letters of events the store refused, written before the
worker kept the entry's own bytes, hold the version-1 blob). Other fields of an entry
without an envelope are kept under ``field:<name>``. A letter whose envelope is past the
bounds of client JSON (``ingest.contract.bounds``) is shown as its bytes, like one that does
not decode, and never requeued: the worker would set it aside again at once.

Requeue is XADD to the partition, then XDEL of the letter. A crash in between leaves the
event both requeued and still dead; requeuing it again adds a second copy to the stream,
which the worker absorbs (the event id is the idempotency key, never the stream id). The
opposite order would lose the event on a crash. At ``REFSTREAM_ACK_DURABILITY=replicas:N``
the XADD reaches N replicas before the XDEL is sent (``ingest.contract.replicated``), or the
letter stays: a failover between the two would send the XADD to the old primary, lost with
it, and the XDEL to the new one, and lose the event (a drop's move, its record). Dropped
letters are not deleted outright: they move, with the operator's reason, to
``{prefix}:dead:dropped`` (built here from ``Keys.dead``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ingest.contract import bounds, clock, layout, wire
from ingest.contract.connections import Command, Redis
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.wire import FIELD, FIELDS, PACKED, EnvelopeError, entry_of

_ID_RE = re.compile(r"^\d+(-\d+)?$")
_PAGE = 500


def dropped_key(keys: Keys) -> str:
    """Where dropped letters go, with their reason: ``{prefix}:dead:dropped``."""
    return keys.dead + ":dropped"


def _text(v: bytes | None) -> str | None:
    return None if v is None else v.decode("utf-8", "backslashreplace")


def _int(v: bytes | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


@dataclass(slots=True)
class DeadLetter:
    dead_id: str
    fields: dict[bytes, bytes]
    envelope: Envelope | None = None
    decode_error: str | None = None

    @classmethod
    def parse(cls, dead_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
        letter = cls(dead_id.decode(), fields)
        try:
            envelope = wire.from_entry(fields)
            bounds.check(envelope.payload)  # as the worker does: nested too deep to write again
        except (EnvelopeError, bounds.BoundsError) as exc:
            letter.decode_error = str(exc)
        else:
            letter.envelope = envelope
        return letter

    @property
    def raw(self) -> bytes:
        """Version 1's envelope bytes (empty for a version-2 or -3 letter: see ``entry``)."""
        return self.fields.get(FIELD, b"")

    @property
    def entry(self) -> dict[bytes, bytes]:
        """The envelope's fields, verbatim: what a requeue appends."""
        return entry_of(self.fields)

    @property
    def stream(self) -> str | None:
        return _text(self.fields.get(b"stream"))

    @property
    def error(self) -> str:
        return _text(self.fields.get(b"error")) or ""

    @property
    def code(self) -> str | None:
        code = self.envelope.payload.get("code") if self.envelope else None
        return code if isinstance(code, str) else None

    def summary(self) -> dict[str, Any]:
        """The list view: where it came from, why it died, and what it was when decodable."""
        e = self.envelope
        return {
            "dead_id": self.dead_id,
            "stream": self.stream,
            "entry_id": _text(self.fields.get(b"id")),
            "error": self.error,
            "deliveries": _int(self.fields.get(b"deliveries")),
            "at_ms": _int(self.fields.get(b"at")),
            "event_id": e.event_id.hex if e else None,
            "type": e.type.name.lower() if e else None,
            "dialect": e.dialect if e else None,
            "code": self.code,
        }

    def detail(self) -> dict[str, Any]:
        """Everything: the decoded envelope, or the raw bytes escaped so a terminal is safe."""
        e = self.envelope
        envelope = None
        if e is not None:
            envelope = {
                "event_id": e.event_id.hex,
                "type": e.type.name.lower(),
                "workspace_id": e.workspace_id,
                "received_at_ms": e.received_at_ms,
                "ip": e.ip,
                "user_agent": e.user_agent,
                "dialect": e.dialect,
                "payload": e.payload,
            }
        extra = {_text(k): _text(v) for k, v in self.fields.items() if k not in _KNOWN}
        return {
            **self.summary(),
            "envelope": envelope,
            "decode_error": self.decode_error,
            "raw": None if e else _text(self.raw),
            "raw_bytes": len(self.raw) if FIELD in self.fields else sum(len(v) for v in self.entry.values()),
            "raw_fields": None if e or FIELD in self.fields else {_text(k): repr(v) for k, v in self.entry.items()},
            "other_fields": extra,
        }


_KNOWN = {b"stream", b"id", b"error", b"deliveries", b"at", PACKED, FIELD, *FIELDS}


@dataclass(frozen=True, slots=True)
class Filter:
    """Letters matching every given criterion (none given: every letter)."""

    error_contains: str | None = None
    code: str | None = None
    stream: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.error_contains is not None and self.error_contains not in letter.error:
            return False
        if self.code is not None and letter.code != self.code:
            return False
        return self.stream is None or letter.stream == self.stream


@dataclass(slots=True)
class Outcome:
    """Counts of one requeue or drop: ``done`` letters moved, ``skipped`` left where they
    are (and why), ``missing`` ids not (or no longer) in the dead stream."""

    matched: int = 0
    done: int = 0
    missing: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def check_id(dead_id: str) -> str:
    if not _ID_RE.match(dead_id):
        raise ValueError(f"not a stream id: {dead_id!r}")
    return dead_id


async def scan(redis: Redis, keys: Keys, *, limit: int | None = None) -> AsyncIterator[DeadLetter]:
    """Every dead letter, oldest first, read a page at a time."""
    start, seen = "-", 0
    while limit is None or seen < limit:
        page = await redis.xrange(keys.dead, min=start, max="+", count=_PAGE)
        for eid, fields in page:
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield DeadLetter.parse(eid, fields or {})
        if len(page) < _PAGE:
            return
        start = "(" + page[-1][0].decode()


async def get(redis: Redis, keys: Keys, dead_id: str) -> DeadLetter | None:
    found = await redis.xrange(keys.dead, min=check_id(dead_id), max=dead_id, count=1)
    return DeadLetter.parse(found[0][0], found[0][1] or {}) if found else None


async def _select(
    redis: Redis, keys: Keys, ids: list[str] | None, flt: Filter | None, out: Outcome
) -> list[DeadLetter]:
    if ids is not None:
        letters = []
        for dead_id in ids:
            letter = await get(redis, keys, dead_id)
            if letter is None:
                out.missing += 1
            else:
                letters.append(letter)
    else:
        flt = flt or Filter()
        letters = [letter async for letter in scan(redis, keys) if flt.matches(letter)]
    out.matched = len(letters)
    return letters


def target_stream(keys: Keys, letter: DeadLetter) -> str | None:
    """The partition the letter came from, when it is still one of ours; else the one its
    routing key (a link code; a sale's customer) routes to now (the partition count may
    have changed since)."""
    if letter.stream in keys.streams:
        return letter.stream
    route = letter.envelope.routing_key() if letter.envelope else None
    return keys.stream_for(route) if route is not None else None


def _xadd(stream: str, fields: dict[Any, Any], *options: str) -> Command:
    return ("XADD", stream, *options, "*", *(x for pair in fields.items() for x in pair))


async def _append(replicated: Replicated, keys: Keys, stream: str, letter: DeadLetter) -> bool:
    """XADD NOMKSTREAM: never into a partition retired meanwhile (``ingest.contract.layout``);
    a written partition whose stream does not exist yet is made first, with its groups."""
    redis = replicated.redis
    for _ in range(2):
        (added,) = await replicated.send([_xadd(stream, letter.entry, "NOMKSTREAM")])
        if added is not None:
            return True
        p = Keys.partition_of(stream)
        if p is None or p >= keys.partitions:
            return False
        try:
            await layout.ensure(redis, keys, p, await layout.groups_of(redis, keys, range(keys.partitions)))
        except layout.Retired:
            return False
    return False


async def requeue(
    redis: Redis,
    keys: Keys,
    *,
    ids: list[str] | None = None,
    flt: Filter | None = None,
    replicated: Replicated | None = None,
) -> Outcome:
    """Put the selected letters' envelopes back on their partitions (see the module doc for
    the crash trade-off). Letters that cannot be decoded are skipped: the worker would
    dead-letter them again at once; drop them instead. ``replicated``: how an XADD reaches
    the durability level before its letter's XDEL (default: none asked)."""
    replicated = replicated or Replicated(redis, 0, 0)
    out = Outcome()
    now = await layout.load(redis, keys, keys.partitions)  # the count the edges write now
    keys = Keys(keys.prefix, now.count)
    for letter in await _select(redis, keys, ids, flt, out):
        if letter.envelope is None:
            out.skip("undecodable")
            continue
        stream = target_stream(keys, letter)
        if stream is None:
            out.skip("no_partition")
            continue
        if not await _append(replicated, keys, stream, letter):
            out.skip("partition_gone")
            continue
        # 0 deleted: a concurrent requeue won the race; its copy and ours count once
        out.done += await redis.xdel(keys.dead, letter.dead_id)
    return out


async def drop(
    redis: Redis,
    keys: Keys,
    reason: str,
    *,
    ids: list[str] | None = None,
    flt: Filter | None = None,
    replicated: Replicated | None = None,
) -> Outcome:
    """Move the selected letters to the dropped stream with ``reason``, then delete them
    (``replicated``: as ``requeue``'s)."""
    if not reason.strip():
        raise ValueError("a reason is required")
    replicated = replicated or Replicated(redis, 0, 0)
    out = Outcome()
    for letter in await _select(redis, keys, ids, flt, out):
        record: dict[Any, Any] = {
            **letter.fields,
            "dead_id": letter.dead_id,
            "reason": reason,
            "dropped_at": clock.now_ms(),
        }
        await replicated.send([_xadd(dropped_key(keys), record)])
        out.done += await redis.xdel(keys.dead, letter.dead_id)
    return out
