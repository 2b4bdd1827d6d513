"""The do-not-track list: a workspace's visitors, customers and IP addresses whose events
refstream answers as usual and never stores (docs/privacy.md).

The list holds keyed digests (the erasure ledger's salt, ``ingest.contract.erasure``), never
a value: ``digest`` is what the management API stores. An edge keeps each digest's
``fingerprint`` (its first 8 bytes), reads every list once at its start and then, every
``REFSTREAM_SUPPRESSION_REFRESH_S``, what changed since (``ingest.privacy.suppressed``); a
workspace lists at most ``REFSTREAM_SUPPRESSION_MAX`` entries. An event naming a listed
visitor id (``visitor_id``), customer (``external_id``) or client address is answered as its
route answers, appended nowhere, and counted as a drop with the reason ``suppressed``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Final

from ingest.contract.events import Envelope

KINDS: Final = ("visitor", "customer", "ip")


def normal(kind: str, value: str) -> str:
    """The form a value is listed and compared in: an address as its canonical text."""
    if kind == "ip":
        try:
            return ipaddress.ip_address(value.strip()).compressed
        except ValueError:
            return value.strip()
    return value


def digest(key: bytes, workspace_id: str, kind: str, value: str) -> bytes:
    text = f"suppress\x1f{workspace_id}\x1f{kind}\x1f{normal(kind, value)}"
    return hashlib.blake2b(text.encode(), key=key, digest_size=16).digest()


def fingerprint(d: bytes) -> int:
    """What an edge keeps of a digest: its first 8 bytes, as an unsigned big-endian number
    (so that the digests' byte order is their fingerprints' order). Two entries of one
    workspace share one with a chance of about n²/2⁶⁵ (1 in 3.7 billion at 100,000 entries),
    and an identifier not listed matches one with about n/2⁶⁴ (1 in 180 trillion)."""
    return int.from_bytes(d[:8], "big")


def named(e: Envelope) -> list[tuple[str, str]]:
    """(kind, value) of what ``e`` says of its person."""
    out = []
    if isinstance(v := e.payload.get("visitor_id"), str) and v:
        out.append(("visitor", v))
    if isinstance(x := e.payload.get("external_id"), str) and x:
        out.append(("customer", x))
    if e.ip:
        out.append(("ip", e.ip))
    return out
