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

from .batcher import Command
from .keys import Keys

PREFIX: Final = "clk_"
FUTURE_SKEW_MS: Final = 60_000  # edges' clocks may run this far ahead of this one


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
    """A click id refstream could have minted in the last ``max_age_s`` (and not in the
    future): one that is not known yet may still be on its way to Postgres."""
    at = minted_at_ms(click_id)
    return at is not None and now_ms - max_age_s * 1000 <= at <= now_ms + FUTURE_SKEW_MS


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


_FROM_EVENTS = """
SELECT l.code, e.workspace_id, e.visitor_id, (extract(epoch FROM e.received_at) * 1000)::bigint AS at_ms,
       e.type = 1 AND NOT e.test_mode AND l.code IS NOT NULL AS usable
FROM events e LEFT JOIN links l ON l.id = e.link_id
WHERE e.event_id = $1
"""


async def in_postgres(pg: asyncpg.Pool, click_id: str) -> ClickRef | bool:
    """A click older than its cache entry (or accepted before a Redis restart); else True
    when the id is a stored event that is no usable click (a test-mode click, a lead),
    False when Postgres has never seen it."""
    event_id = parse(click_id)
    if event_id is None:
        return False
    row = await pg.fetchrow(_FROM_EVENTS, event_id)
    if row is None:
        return False
    if not row["usable"]:
        return True
    return ClickRef(click_id, row["code"], str(row["workspace_id"]), row["visitor_id"] or click_id, row["at_ms"])


async def from_postgres(pg: asyncpg.Pool, click_id: str) -> ClickRef | None:
    found = await in_postgres(pg, click_id)
    return found if isinstance(found, ClickRef) else None
