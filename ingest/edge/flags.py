"""Feature kill switches: a key in Redis, read in the same round trip as the rate limit."""

from __future__ import annotations

from typing import Final

from ingest.contract.connections import Redis
from ingest.contract.keys import Keys

FEATURES: Final = ("referral",)
DISABLED: Final = b"disabled"


def is_disabled(reply: object) -> bool:
    if isinstance(reply, Exception):
        raise reply
    return reply == DISABLED


async def set_enabled(redis: Redis, keys: Keys, feature: str, enabled: bool) -> None:
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; known: {', '.join(FEATURES)}")
    if enabled:
        await redis.delete(keys.flag(feature))
    else:
        await redis.set(keys.flag(feature), DISABLED)
