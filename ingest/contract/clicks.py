"""Click ids: ``clk_`` + the 32 hex digits of the click event's UUIDv7.

When the edge accepts a click it writes ``{prefix}:click:{click_id}`` (link code,
workspace, visitor) for the program's cookie window, in the same round trip as the XADD
(or, spooled, with the XADD when the spool drains), so a lead sent straight after its
click resolves before any worker has run. Older clicks are found in Postgres. A click id
neither knows that refstream could have minted recently (``may_be_pending``) may still wait
in an edge's spool or a stream: the routes answer "retry", never a permanent 400.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from ingest.contract.connections import Command
from ingest.contract.keys import Keys

PREFIX: Final = "clk_"


def mint(event_id: uuid.UUID) -> str:
    return PREFIX + event_id.hex


def parse(click_id: str) -> uuid.UUID | None:
    """The event id inside a click id refstream minted; None for anything else."""
    if not click_id.startswith(PREFIX) or len(click_id) != len(PREFIX) + 32:
        return None
    try:
        return uuid.UUID(hex=click_id[len(PREFIX) :])
    except ValueError:
        return None


def minted_at_ms(click_id: str) -> int | None:
    """The Unix ms time inside a click id's UUIDv7; None for anything else."""
    event_id = parse(click_id)
    if event_id is None or event_id.version != 7:
        return None
    return event_id.int >> 80


def may_be_pending(click_id: str, now_ms: int, max_age_s: int) -> bool:
    """A click id refstream could have minted within ``max_age_s`` of ``now_ms`` (Postgres's
    clock): one that is not known yet may still be on its way to Postgres. Ahead of now as
    well as behind: an edge whose clock runs ahead (within REFSTREAM_CLOCK_SKEW_MAX_S, or
    before it noticed it does not) mints ids from the future, and its lead must not be
    refused as unknown while the click waits in a spool (the generative test's seed
    176492717: 400s for clicks an edge an hour ahead had minted)."""
    at = minted_at_ms(click_id)
    return at is not None and abs(now_ms - at) <= max_age_s * 1000


@dataclass(frozen=True, slots=True)
class ClickRef:
    click_id: str
    code: str
    workspace_id: str
    visitor_id: str
    at_ms: int

    def cache_command(self, keys: Keys, ttl_s: int) -> Command:
        """The cache entry, until ``ttl_s`` after the click (an absolute time: the same
        whether the command is sent now or replayed from the spool later)."""
        body = orjson.dumps({"c": self.code, "w": self.workspace_id, "v": self.visitor_id, "t": self.at_ms})
        return ("SET", keys.click(self.click_id), body, "PXAT", self.at_ms + ttl_s * 1000)


def decode(click_id: str, raw: object) -> ClickRef | None:
    if not isinstance(raw, bytes):
        return None
    try:
        d: dict[str, Any] = orjson.loads(raw)
        return ClickRef(click_id, d["c"], d["w"], d["v"], d["t"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


# with Postgres's clock: whether an unknown id may still be on its way is decided on the
# database's time, never on this process's (an edge whose clock runs ahead would call a
# click minted a moment ago old, and refuse its lead)
_FROM_EVENTS = """
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms, c.*
FROM (SELECT 1) one LEFT JOIN LATERAL (
    SELECT l.code, e.workspace_id, e.visitor_id, (extract(epoch FROM e.received_at) * 1000)::bigint AS at_ms,
           e.type = 1 AND NOT e.test_mode AND l.code IS NOT NULL AS usable
    FROM events e LEFT JOIN links l ON l.id = e.link_id
    WHERE e.event_id = $1
) c ON true
"""


async def in_postgres(pg: asyncpg.Pool, click_id: str) -> tuple[ClickRef | bool, int | None]:
    """A click older than its cache entry (or accepted before a Redis restart); else True
    when the id is a stored event that is no usable click (a test-mode click, a lead),
    False when Postgres has never seen it. With Postgres's clock (ms), for ``may_be_pending``
    (None for an id that is no click id: no question was asked)."""
    event_id = parse(click_id)
    if event_id is None:
        return False, None
    row = await pg.fetchrow(_FROM_EVENTS, event_id)
    now_ms: int = row["now_ms"]
    if row["usable"] is None:
        return False, now_ms
    if not row["usable"]:
        return True, now_ms
    ref = ClickRef(click_id, row["code"], str(row["workspace_id"]), row["visitor_id"] or click_id, row["at_ms"])
    return ref, now_ms


async def from_postgres(pg: asyncpg.Pool, click_id: str) -> ClickRef | None:
    found, _ = await in_postgres(pg, click_id)
    return found if isinstance(found, ClickRef) else None
