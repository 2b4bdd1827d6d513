"""Appending envelopes to their stream partition, through the micro-batcher."""

from __future__ import annotations

from .batcher import Command
from .events import FIELD, Envelope
from .keys import Keys


def xadd(keys: Keys, envelope: Envelope, routing_key: str) -> Command:
    """XADD with an auto id and no MAXLEN: trimming is the workers' job, by MINID below
    every group's oldest pending entry, so nothing is trimmed before it is acked."""
    return ("XADD", keys.stream_for(routing_key), "*", FIELD, envelope.encode())


def check(reply: object) -> None:
    if isinstance(reply, Exception):
        raise reply
