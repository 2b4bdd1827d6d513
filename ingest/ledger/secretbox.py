"""Webhook signing secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``).

A signing secret must be available in full to sign every delivery, so unlike API keys it
cannot be stored as a hash: it is stored encrypted under ``REFSTREAM_SECRET_KEY`` and
shown to the user once, when the webhook is created.

The key is a urlsafe-base64 encoding of 32 random bytes (``generate_key()`` makes one).
Several keys separated by commas rotate: the first encrypts, every one of them decrypts,
so old tokens stay readable while they are re-encrypted under the new key.
"""

from __future__ import annotations

import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

SECRET_PREFIX = "whsec_"
DISPLAY_CHARS = 10  # "whsec_" and four characters: enough to recognise, useless to sign


class SecretKeyError(RuntimeError):
    """The secret key is missing or malformed, or does not open a stored token.

    A configuration problem, not a transient one: retrying will not help until an operator
    sets ``REFSTREAM_SECRET_KEY`` (the key the secrets were encrypted with).
    """


def generate_key() -> str:
    """A fresh key for ``REFSTREAM_SECRET_KEY``."""
    return Fernet.generate_key().decode()


def new_secret() -> str:
    """A webhook signing secret: ``whsec_`` and 43 urlsafe characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def display_prefix(secret: str) -> str:
    """The part of a secret that may be stored and shown in listings."""
    return secret[:DISPLAY_CHARS]


def _box(key: str | None) -> MultiFernet:
    if not key or not key.strip():
        raise SecretKeyError("no secret key configured: set REFSTREAM_SECRET_KEY")
    try:
        return MultiFernet([Fernet(k.strip().encode()) for k in key.split(",") if k.strip()])
    except (ValueError, TypeError):
        # never echo the key itself into the message
        raise SecretKeyError(
            "REFSTREAM_SECRET_KEY is not a valid key: urlsafe-base64 of 32 bytes (see generate_key())"
        ) from None


def encrypt(key: str | None, secret: str) -> bytes:
    """The Fernet token for ``secret`` under the first of the configured keys."""
    return _box(key).encrypt(secret.encode())


def decrypt(key: str | None, token: bytes) -> str:
    """The secret inside ``token``; :class:`SecretKeyError` when no configured key opens it."""
    try:
        return _box(key).decrypt(bytes(token)).decode()
    except InvalidToken:
        raise SecretKeyError("stored secret does not decrypt under REFSTREAM_SECRET_KEY (key changed?)") from None
