"""Idempotency keys: a retried request counts once (docs/guarantees.md).

A client names a request with a key (``Idempotency-Key`` header, a batch item's
``idempotency_key``, tracker.js's ``dedupe``); a repeat of the key within the window gets
the first answer, byte for byte, and appends nothing.

Event routes: the answer is known before the event is appended (ids are minted at the
edge), so one script, in the same round trip as the XADD would have been, either finds the
key's record and returns it, or appends the event and stores the answer under the key.
An event that goes to the spool instead (Redis unreachable on a public route, or an append
whose outcome is unknown on any route: ``ingest.edge.enqueue``) keeps that check, and the drain
runs the same script (``ingest.link.once``). Every copy also carries the key's dedupe value (``dedupe``): the
digest and the window the copy was received in, so the workers store one event per key
whichever copies reach them, and a key used again a window later is a new event.
The record carries its stream partition's hash tag (the routing key picks the partition,
and a retry has the routing key of its first), so the script is legal on a Redis Cluster;
and being one script it is atomic: of two copies in flight at once, one appends, the other
gets its answer. Management writes change Postgres, which no script can join: a reservation
(a script: the record, or a reservation made), then the answer stored once the handler returned 2xx, or the reservation
dropped when it did not (a refused request moved nothing, and is evaluated afresh).

Each record holds a fingerprint of the request: the same key with another body is refused
(422), never answered with the other request's answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken

from ingest.contract import bounds, clock, erasure_index, ids, wire
from ingest.contract.connections import Command
from ingest.contract.errors import NotSent, OutcomeUnknown, Refused
from ingest.contract.events import Envelope, unique_token
from ingest.contract.keys import Keys
from ingest.contract.layout import Layout
from ingest.edge.batcher import RedisBatcher
from ingest.link.once import APPEND_ONCE
from ingest.spool.store import Once

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"  # set on an answer that is a repeat's
KEY_RULE = "1-255 printable ASCII characters"
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
PENDING = 0  # the status of a reservation whose request is still running
RESERVATION_MS = 60_000  # a reservation outlives any request; a crashed edge's expires
WAIT_FOR_FIRST_S = 2.0  # a management repeat waits this long for the first copy's answer

# KEYS[1] the key's record; ARGV: a reservation, its ms. The record if there is one, else
# the reservation is made (a script, not SET NX GET: one reply shape on every client)
RESERVE = """
local first = redis.call('GET', KEYS[1])
if first then return first end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# drop a reservation only if it is still ours (ARGV[1]): never another request's record
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class InvalidKey(Refused, ValueError):
    """A key that is not 1-255 printable ASCII characters: the route answers 400."""


def valid_key(value: object) -> str:
    if isinstance(value, str) and _KEY.fullmatch(value):
        return value
    raise InvalidKey(f"{HEADER}: {KEY_RULE}")


def header_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, None without one; ``InvalidKey`` when malformed.
    A placeholder (``undefined``, ``null``: a client's unset variable) is no one's key, as
    if none were sent: taken, it would answer every later request as the first."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidKey(f"{HEADER}: send one")
    return None if ids.placeholder(values[0]) else valid_key(values[0])


def request_claim(request: web.Request, key: str, workspace: str, raw: bytes) -> Claim:
    """A whole request's claim: scoped by workspace, method and route; asking its path and
    its body (``raw``; JSON key order aside)."""
    try:
        asked: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        asked = raw.hex()
    if not bounds.within(asked):
        # nested past what orjson writes (the handler's parse refuses it with a 400): the
        # fingerprint asks the bytes
        asked = raw.hex()
    resource = request.match_info.route.resource
    route = f"{request.method} {resource.canonical if resource else request.path}"
    return Claim.of(key, route, workspace, fingerprint(request.method, request.path, asked))


def fingerprint(*parts: Any) -> str:
    """What a request asked, order of JSON keys aside: a repeat must ask the same. The parts
    nest a body one level down: within ``ingest.contract.bounds`` (the routes fingerprint
    what they parsed and checked; ``request_claim`` checks first), far from orjson's 255."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Claim:
    """A key in its scope (route, workspace, and for public routes the link), digested: the
    key itself is never stored."""

    digest: str
    fingerprint: str
    workspace: str | None = None  # named by its record (``Keys.idempotent``)

    @classmethod
    def of(cls, key: str, route: str, workspace: str | None, fp: str, link: str = "") -> Claim:
        scope = "\x00".join((route, workspace or "", link, key))
        return cls(hashlib.sha256(scope.encode()).hexdigest()[:32], fp, workspace or None)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    fingerprint: str

    def encode(self) -> bytes:
        return f"{self.fingerprint}{self.status:03d}".encode() + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Answer:
        return cls(int(raw[32:35]), raw[35:], raw[:32].decode())

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            body=self.body,
            status=self.status,
            content_type="application/json",
            headers={**(headers or {}), REPLAYED: "true"},
        )


Refuse = Callable[[int, str, str], web.Response]  # (status, code, message) in the route's shape
REUSED = "This Idempotency-Key was used with another request"


def replay(first: Answer, claim: Claim, refuse: Refuse, headers: dict[str, str] | None = None) -> web.Response:
    """The first request's answer for a repeat; 422 when the repeat asked something else."""
    if first.fingerprint != claim.fingerprint:
        return refuse(422, "idempotency_key_reused", REUSED)
    return first.response(headers)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A keyed event's append, made once (``Idempotency.prepare``)."""

    command: erasure_index.Filed  # the script, with what files its record beside it
    check: Once  # what a spooled copy keeps, to be drained through the same script
    first: Answer | None  # on a Redis Cluster: the answer a record from an earlier count holds


@dataclass(frozen=True, slots=True)
class _Places:
    partition: int
    stream: str
    record: str
    earlier: tuple[str, ...]  # the key's records under earlier partition counts
    older: tuple[str, ...]  # those, and on one server its records from before they named a workspace
    workspace: str | None  # whose index of records files it (``Keys.answers``)


class Idempotency:
    """Held by the edge: the scripts, the window, and the answers it gave from its spool."""

    def __init__(
        self,
        batcher: RedisBatcher,
        keys: Keys,
        *,
        window_s: int,
        cluster: bool = False,
        layout: Callable[[], Layout] | None = None,
    ) -> None:
        self.keys = keys
        self.window_ms = window_s * 1000
        self.cluster = cluster
        self._layout = layout  # the edge's current partition layout
        self._append_sha = batcher.script(APPEND_ONCE)
        self._reserve_sha = batcher.script(RESERVE)
        self._release_sha = batcher.script(RELEASE)
        self._file_sha = batcher.script(erasure_index.FILE_ANSWER, keeps_memo=True)

    # -- event routes: one script instead of the XADD ---------------------------------

    def dedupe(self, claim: Claim, envelope: Envelope) -> str:
        """The key's dedupe value for ``envelope``: its digest and the window it came in.
        Copies a window apart never share it (the key is new again); two copies in one
        window share it unless they straddle a window's edge, where the key's record (the
        script, the drain's check) still keeps one while it lives."""
        return f"idem:{claim.digest}:{envelope.received_at_ms // self.window_ms}"

    async def prepare(
        self, batcher: RedisBatcher, claim: Claim, routing_key: str, envelope: Envelope, answer: Answer
    ) -> Prepared:
        """A keyed event's append, made once: the script that appends ``envelope`` unless
        the key has a record, with what files the record (``erasure_index.Filed``), and the
        check a spooled copy keeps. On a Redis Cluster, where one script cannot read them,
        the first answer among the key's records from earlier partition counts is read
        first, in a round trip of its own (``Prepared.first``: the append is then not sent;
        two copies of one key sent at once across a count change may both be appended, and
        the workers store one: their dedupe value is the key's; a Redis that cannot say is
        met again by the append, which says what it means). Marks the envelope with the
        key's dedupe value (a conversion keeps its own)."""
        envelope.payload.setdefault("dedupe", self.dedupe(claim, envelope))
        encoded = answer.encode()
        at = self._places(claim, routing_key, envelope.workspace_id or claim.workspace)
        first = None
        if self.cluster and at.earlier:
            try:
                for reply in await batcher.execute(*(("GET", r) for r in at.earlier)):
                    if isinstance(reply, Exception):
                        raise reply
                    if reply is not None:
                        first = Answer.decode(bytes(reply))
                        break
            except (NotSent, OutcomeUnknown):
                pass  # the append meets the same trouble, and says what it means
        entry = wire.to_entry(envelope)
        if self.cluster:
            command: Command = (
                "EVALSHA",
                self._append_sha,
                2,
                at.record,
                at.stream,
                encoded,
                self.window_ms,
                "",
                "",
                *entry,
            )
        else:
            changed = self._layout().changed_ms if self._layout is not None else 0
            command = (
                "EVALSHA",
                self._append_sha,
                3 + len(at.older),
                at.record,
                at.stream,
                self.keys.layout,
                *at.older,
                encoded,
                self.window_ms,
                self.keys.partitions,
                changed,
                *entry,
            )
        # the record filed under its event once the script appended (ingest.edge.erasure_index):
        # an erasure's sweep reads the records of the person's own events, never every record
        filed = (
            erasure_index.answer_commands(
                self.keys,
                at.workspace,
                (at.partition, envelope.event_id, claim.digest, claim.workspace is not None),
                self.window_ms,
                self._file_sha,
            )
            if at.workspace is not None
            else ()
        )
        return Prepared(erasure_index.Filed(command, filed), Once(at.record, encoded, self.window_ms), first)

    def _places(self, claim: Claim, routing_key: str, workspace: str | None) -> _Places:
        """Where the key's records are (``Keys.idempotent``): its partition's stream and record,
        its records in the partitions that counts of the last window gave it (a partition
        count changed: ``ingest.contract.layout``), and, on one server, those an edge wrote
        before records named their workspace (a repeat within the window after an upgrade
        gets their answer too; on a Redis Cluster, where one script reads its slot's keys
        alone, such a repeat is answered afresh, and stored once by the key's dedupe value);
        ``workspace``, whose index of records files it (``Keys.answers``)."""
        keys = self.keys
        counts = self._layout().earlier(clock.now_ms()) if self._layout is not None else ()
        partition = keys.partition_for(routing_key)
        others = sorted({keys.partition_for(routing_key, c) for c in counts} - {partition})
        earlier = tuple(keys.idempotent(claim.digest, p, claim.workspace) for p in others)
        older = earlier
        if claim.workspace is not None and not self.cluster:
            older += tuple(keys.idempotent(claim.digest, p) for p in (partition, *others))
        record = keys.idempotent(claim.digest, partition, claim.workspace)
        return _Places(partition, keys.stream(partition), record, earlier, older, workspace or None)

    def check(self, claim: Claim, routing_key: str, answer: Answer) -> Once:
        """What a spooled copy keeps to be drained through the same script."""
        record = self.keys.idempotent(claim.digest, self.keys.partition_for(routing_key), claim.workspace)
        return Once(record, answer.encode(), self.window_ms)

    # -- management writes: reserve, run, store -----------------------------------------

    async def once(
        self,
        batcher: RedisBatcher,
        claim: Claim,
        secret: str,
        key: str,
        run: Callable[[], Awaitable[web.Response]],
        refuse: Refuse,
    ) -> web.Response:
        """Run ``run`` once per claim in the window. Its 2xx answer is stored encrypted
        under a key derived from the caller's API key and idempotency key (a created API
        key or webhook secret is in it), and replayed to a repeat. ``refuse(status, code,
        message)`` renders this route's errors. Raises what Redis raised (``NotSent``,
        ``OutcomeUnknown``)."""
        record = self.keys.idempotent(claim.digest)
        token = f"{claim.fingerprint}{PENDING:03d}{unique_token()}".encode()
        (first,) = await batcher.execute(("EVALSHA", self._reserve_sha, 1, record, token, RESERVATION_MS))
        if isinstance(first, Exception):
            raise first
        if first is not None:
            return await self._repeat(batcher, record, first, claim, secret, key, refuse)
        try:
            response = await run()
        except BaseException:
            await _quietly(batcher.execute(("EVALSHA", self._release_sha, 1, record, token)))
            raise
        if 200 <= response.status < 300 and isinstance(response.body, bytes):
            sealed = _box(secret, key).encrypt(response.body)
            answer = Answer(response.status, sealed, claim.fingerprint).encode()
            await _quietly(batcher.execute(("SET", record, answer, "PX", self.window_ms)))
        else:
            await _quietly(batcher.execute(("EVALSHA", self._release_sha, 1, record, token)))
        return response

    async def _repeat(
        self,
        batcher: RedisBatcher,
        record: str,
        first: bytes,
        claim: Claim,
        secret: str,
        key: str,
        refuse: Refuse,
    ) -> web.Response:
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        while first[32:35] == b"%03d" % PENDING and first[:32].decode() == claim.fingerprint:
            if time.monotonic() > deadline:
                return refuse(409, "idempotency_in_progress", "A request with this Idempotency-Key is in progress")
            await asyncio.sleep(0.02)  # the first copy is running: its answer is the answer
            (first,) = await batcher.execute(("GET", record))
            if isinstance(first, Exception):
                raise first
            if first is None:  # the first copy failed and let go: this one may run
                return refuse(409, "idempotency_in_progress", "Retry: the first request with this key failed")
        answer = Answer.decode(first)
        if answer.fingerprint != claim.fingerprint:
            return refuse(422, "idempotency_key_reused", REUSED)
        try:
            return web.Response(
                body=_box(secret, key).decrypt(answer.body),
                status=answer.status,
                content_type="application/json",
                headers={REPLAYED: "true"},
            )
        except InvalidToken:  # unreachable for the same API key; a defence, not a path
            return refuse(422, "idempotency_key_reused", "This Idempotency-Key was used with another API key")


def _box(secret: str, key: str) -> Fernet:
    # neither the API key nor the idempotency key is stored: Redis alone cannot open it
    raw = hashlib.sha256(b"refstream idempotency\x00" + secret.encode() + b"\x00" + key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(raw))


async def _quietly(call: Awaitable[Any]) -> None:
    """Bookkeeping after the effect: its failure must not turn a done write into an error
    (a lost record only means a repeat runs again, as without a key)."""
    try:
        await call
    except (NotSent, OutcomeUnknown):
        pass
