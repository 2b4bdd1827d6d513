"""API keys: shown once, stored as sha256 with a display prefix."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

WORKSPACE_KEY_PREFIX = "rs_live_"
AFFILIATE_KEY_PREFIX = "rsa_live_"
SCOPES = frozenset({"read", "write", "track", "erase", "*"})  # "erase": only by name (auth.EXPLICIT)
_DISPLAY_RANDOM_CHARS = 6


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str  # the whole key: returned to the caller once, never stored or logged
    prefix: str  # what listings show and `keys revoke` takes
    digest: bytes  # sha256(secret): what is stored


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def mint(kind: str = "workspace") -> NewKey:
    head = AFFILIATE_KEY_PREFIX if kind == "affiliate" else WORKSPACE_KEY_PREFIX
    secret = head + secrets.token_urlsafe(32)
    return NewKey(secret=secret, prefix=secret[: len(head) + _DISPLAY_RANDOM_CHARS], digest=hash_key(secret))


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    return sorted(set(scopes))
