"""What an erasure must reach in Redis, indexed where it is written, so that the sweep
(``workers.ops.erasure``) reads the erased people's own keys and entries, never everyone's.

The sweep finds the person by the ledger (their digests, in their workspace) and by their
rows in Postgres (their events, under the pseudonyms the ledger's digests make). From those
it derives the names of what it must reach, and reads nothing else:

- A stream entry, by its event: an entry is appended within moments of its event's time
  (its id's), so the sweep reads its stream from just before that time (``NEAR_BEFORE_MS``,
  ``NEAR_AFTER_MS``). An entry the workers meet outside that window (a spool drained late, a
  stalled append Redis ran late, an edge whose clock was off), that no row will hold (its
  link went before it was stored) or that is a second copy of an event is filed by the
  workers under each of its ledger digests (``Keys.entries_of``, ``entry_commands``).
- An idempotency record of a keyed event, by its event: the edge files each record it
  writes under its event's time and id (``Keys.answers``, ``answer_commands``), beside the
  append, pruned a window after Redis filed it (Redis's clock, never the edge's).
- Affixo's fingerprint cache, by its visitor: each entry the edge writes is filed under its
  visitor's ledger digest (``Keys.fingerprints_of``, ``fingerprint_commands``).

Every index holds digests, hashes and ids, never a personal value; each is written by the
writer of what it indexes, with it or right after it, and is best effort (a lost index
entry leaves its key to its own expiry, as before the sweep could find it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from ingest.contract import erasure
from ingest.contract.connections import Command
from ingest.contract.erasure import VISITOR
from ingest.contract.events import Envelope
from ingest.contract.keys import Keys, parse_id

# an entry appended this long before its event's time (a clock a little behind) or after it
# (a round trip, a queue) is found by its time; any other is filed by the workers
NEAR_BEFORE_MS = 1_000
NEAR_AFTER_MS = 5_000
# how long an index of entries keeps what it filed (the streams hold acked entries an hour by
# default; unread ones as long as a group lags): refreshed by every entry filed
ENTRIES_TTL_S = 8 * 86400
# as long as the fingerprint cache keeps an entry (``ingest.edge.bodies.FINGERPRINT_TTL_S``)
FINGERPRINT_TTL_S = 90 * 86400
# an answer's index entry outlives its record by this much (both are pruned by Redis's clock;
# the index by when it was filed, the record by its expiry)
ANSWER_SLACK_MS = 3_600_000
# the most index entries one filing prunes: each filing adds one, so a few keep up
ANSWER_PRUNE = 16

# KEYS: the index by event time (``Keys.answers``), the same members by filing time
# (``Keys.answers_filed``); ARGV: the event's time, the member, how long an entry lives (ms).
# Filed by event time, where the sweep looks an event up; pruned by Redis's time, so that an
# edge whose clock is off (ahead: its event times would prune the present's filings; behind:
# its own would be pruned by the next) never decides what leaves. Returns how many it pruned.
FILE_ANSWER = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - keep), 'LIMIT', 0, {ANSWER_PRUNE})
if #old > 0 then
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return #old
"""


def event_ms(event_id: uuid.UUID) -> int:
    """The time a UUIDv7 event id was minted (its first 48 bits)."""
    return event_id.int >> 80


def near(event_id: uuid.UUID, entry_id: object) -> bool:
    """Whether the stream entry ``entry_id`` of the event ``event_id`` is where the sweep
    looks for it by its time."""
    at = parse_id(entry_id)[0]
    ms = event_ms(event_id)
    return ms - NEAR_BEFORE_MS <= at <= ms + NEAR_AFTER_MS


def answer_member(event_id: uuid.UUID, partition: int, digest: str, named: bool) -> str:
    """An answer's index entry: its event, its record's partition and digest, whether the
    record names its workspace (``Keys.idempotent``)."""
    return f"{event_id.hex}:{partition}:{digest}:{'w' if named else ''}"


def parse_answer(member: bytes | str) -> tuple[str, int, str, bool] | None:
    """(event id in hex, partition, digest, whether the record names its workspace)."""
    text = member.decode() if isinstance(member, bytes) else member
    parts = text.split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2], parts[3] == "w"


def answer_commands(
    keys: Keys,
    workspace: str,
    filing: tuple[int, uuid.UUID, str, bool],
    window_ms: int,
    sha: str | None = None,
) -> tuple[Command, ...]:
    """The command that files a keyed event's record under its workspace's index
    (``Keys.answers``, ``FILE_ANSWER``): ``filing`` is (the record's partition, the event,
    the record's digest, whether the record names its workspace). ``sha``: the script's, as
    the caller's batcher registered it; else the script is sent whole."""
    partition, event_id, digest, named = filing
    member = answer_member(event_id, partition, digest, named)
    script: tuple[str, str] = ("EVALSHA", sha) if sha is not None else ("EVAL", FILE_ANSWER)
    index, by_filing = keys.answers(workspace), keys.answers_filed(workspace)
    return ((*script, 2, index, by_filing, event_ms(event_id), member, window_ms + ANSWER_SLACK_MS),)


def record_commands(keys: Keys, e: Envelope, record: str, window_ms: int) -> tuple[Command, ...]:
    """``answer_commands`` for the record named ``record`` (``Keys.idempotent``, with its
    partition's tag) of the event ``e``: what a spool's drain files for a keyed row."""
    partition = Keys.record_partition(record)
    workspace = e.workspace_id or Keys.record_workspace(record)
    if partition is None or workspace is None:
        return ()
    digest = record.rpartition(":")[2]
    named = Keys.record_workspace(record) is not None
    return answer_commands(keys, workspace, (partition, e.event_id, digest, named), window_ms)


class Filed(tuple[Any, ...]):
    """A command, with what files what it writes (``beside``): the edge sends those in the
    same request, before it (``ingest.edge.keyed``, ``ingest.edge.routes.batch``), so a
    filing a full Redis refuses leaves nothing written that it would have named; a repeat's
    filing (or one whose command was refused) names an event no row will hold, and is
    pruned with the window."""

    beside: tuple[Command, ...]

    def __new__(cls, command: Command, beside: tuple[Command, ...]) -> Filed:
        made = super().__new__(cls, command)
        made.beside = beside
        return made


def fingerprint_commands(keys: Keys, salt: bytes, command: Command) -> tuple[Command, ...]:
    """For a ``SET`` of an entry of Affixo's fingerprint cache (``Keys.fingerprint``): the
    commands that file it under its visitor's ledger digest; () for any other command."""
    if len(command) < 3 or command[0] != "SET" or not isinstance(name := command[1], str):
        return ()
    head = f"{keys.prefix}:fp:"
    if not name.startswith(head):
        return ()
    workspace, _, fingerprint = name[len(head) :].rpartition(":")
    value = command[2]
    visitor = value.decode(errors="replace") if isinstance(value, bytes) else value
    if not workspace or not isinstance(visitor, str) or not visitor or erasure.is_pseudonym(visitor):
        return ()
    index = keys.fingerprints_of(workspace, erasure.digest(salt, VISITOR, visitor))
    return (("SADD", index, fingerprint), ("EXPIRE", index, FINGERPRINT_TTL_S))


def entry_commands(
    keys: Keys, salt: bytes, partition: int, entry_id: object, e: Envelope, workspace_id: str
) -> list[Command]:
    """The commands that file a stream entry the sweep would not find by its event's time,
    under each of its ledger digests in its workspace (``Keys.entries_of``)."""
    sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    out: list[Command] = []
    for d in erasure.digests_of(salt, e, workspace_id):
        index = keys.entries_of(workspace_id, d)
        out += [("SADD", index, f"{partition}:{sid}"), ("EXPIRE", index, ENTRIES_TTL_S)]
    return out


def parse_entry(member: bytes | str) -> tuple[int, str] | None:
    """An entries index's member: (partition, entry id), None if it is not one."""
    text = member.decode() if isinstance(member, bytes) else member
    p, _, sid = text.partition(":")
    return (int(p), sid) if p.isdigit() and sid else None


def merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Time spans (ms, inclusive) merged where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
