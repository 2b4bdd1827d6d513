"""Feature kill switches: a key in Redis, read in the same round trip as the rate limit."""

from __future__ import annotations

from typing import Final

from ingest.contract.connections import Command, Redis
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated

FEATURES: Final = ("referral",)
DISABLED: Final = b"disabled"


def is_disabled(reply: object) -> bool:
    if isinstance(reply, Exception):
        raise reply
    return reply == DISABLED


async def set_enabled(
    redis: Redis, keys: Keys, feature: str, enabled: bool, *, replicas: int = 0, wait_ms: int = 500
) -> None:
    """Turn ``feature`` on or off for every edge; at ``REFSTREAM_ACK_DURABILITY=replicas:N``
    (``replicas``) it returns once N replicas hold the switch (``Unreplicated`` if short):
    a failover that lost it would turn a killed feature back on, with the operator told done."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; known: {', '.join(FEATURES)}")
    switch: Command = ("DEL", keys.flag(feature)) if enabled else ("SET", keys.flag(feature), DISABLED)
    writer = Replicated(redis, replicas, wait_ms)
    try:
        await writer.send([switch], f"the switch of {feature}")
    finally:
        await writer.aclose()
