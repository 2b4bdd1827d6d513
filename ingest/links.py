"""The link cache in Redis: what the edge knows about a referral code without Postgres.

``{prefix}:link:{code}`` holds the link as compact JSON, or ``-`` for a code known not to
exist. Writers:
- the management side (``ingest.admin``) SETs after its Postgres commit: authoritative;
- workers fill it with SET NX after resolving codes in Postgres, so a cache lost with a
  Redis restart heals itself, and a worker's older read never overwrites a newer write.
A miss is not "unknown": the edge enqueues the event and the worker decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson

from .connections import Redis
from .keys import Keys

POSITIVE_TTL_S: Final = 24 * 3600
NEGATIVE_TTL_S: Final = 300
_MISSING: Final = b"-"


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: str
    workspace_id: str
    program_id: str
    affiliate_id: str
    code: str
    url: str
    domain: str | None
    status: str

    @property
    def active(self) -> bool:
        return self.status == "active"

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_record(cls, r: Any) -> LinkInfo:
        return cls(
            id=str(r["id"]),
            workspace_id=str(r["workspace_id"]),
            program_id=str(r["program_id"]),
            affiliate_id=str(r["affiliate_id"]),
            code=r["code"],
            url=r["url"],
            domain=r["domain"],
            status=r["status"],
        )


class Missing:
    """The code is known not to exist (negative cache entry)."""


MISSING: Final = Missing()


def decode(raw: bytes | None) -> LinkInfo | Missing | None:
    """None: not cached. MISSING: known unknown. Else the link."""
    if raw is None:
        return None
    if raw == _MISSING:
        return MISSING
    try:
        return LinkInfo(**orjson.loads(raw))
    except (orjson.JSONDecodeError, TypeError):
        return None  # unreadable entry: treat as a miss, the worker will overwrite it


async def put(redis: Redis, keys: Keys, link: LinkInfo) -> None:
    await redis.set(keys.link(link.code), link.encode(), ex=POSITIVE_TTL_S)


async def fill(redis: Redis, keys: Keys, found: list[LinkInfo], missing: list[str]) -> None:
    """Worker-side fill: only where nothing is cached (SET NX), one round trip."""
    if not found and not missing:
        return
    pipe = redis.pipeline(transaction=False)
    for link in found:
        pipe.set(keys.link(link.code), link.encode(), ex=POSITIVE_TTL_S, nx=True)
    for code in missing:
        pipe.set(keys.link(code), _MISSING, ex=NEGATIVE_TTL_S, nx=True)
    await pipe.execute()
