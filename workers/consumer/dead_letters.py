"""Dead letters (``{prefix}:dead``): the entries the pipeline sets aside (``Dead``), each
written as read from the stream (``write``); ``workers.ops.dead`` lists, requeues and drops them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from ingest.contract import clock
from ingest.contract.connections import Command
from ingest.contract.keys import Keys
from ingest.contract.replicated import Replicated
from ingest.contract.wire import FIELD, entry_of

log = structlog.get_logger("workers.pipeline")


@dataclass(slots=True)
class Dead:
    """An entry set aside: its fields as read from the stream, never written again from a
    decoded envelope (a document orjson parsed may be one it cannot write: the letter must
    never fail for what the entry holds)."""

    entry_id: bytes
    error: str
    fields: dict[bytes, bytes]
    attempts: int = 1


async def write(replicated: Replicated, keys: Keys, stream: str, dead: list[Dead]) -> None:
    """One XADD per letter, of bytes only: nothing in it is encoded from what the entry
    decoded to, so no entry can make its own letter fail (a letter that could not be
    written would stop its partition). At replicas:N, returns once N replicas hold them:
    the ack of their entries follows (``ingest.contract.replicated``)."""
    commands: list[Command] = []
    now = clock.now_ms()
    for d in dead:
        fields: dict[Any, Any] = {
            "stream": stream,
            "id": d.entry_id,
            # an exception's text may quote the entry (lone surrogates included): as bytes
            "error": d.error[:1000].encode("utf-8", "backslashreplace"),
            "deliveries": d.attempts,
            "at": now,
        }
        # the envelope's own fields verbatim (version 1's ``e``, version 2's, or version 3's ``v``), so the
        # letter can be decoded and requeued; anything else under ``field:``
        entry = entry_of(d.fields)
        if not entry:
            fields[FIELD] = b""  # no envelope at all: the letter still has the field
        fields.update(entry)
        for k, v in [(k, v) for k, v in d.fields.items() if k not in entry][:16]:
            fields[b"field:" + k[:64]] = v[:4096]
        commands.append(("XADD", keys.dead, "*", *(x for pair in fields.items() for x in pair)))
    await replicated.send(commands)
    # the dead letters hold each error in full; the line says only where each failed
    # (decode, store, ...): an error's text may quote a person's id or address
    kinds = sorted({d.error.split(":", 1)[0][:80] for d in dead})[:5]
    log.warning("dead_letter", stream=stream, count=len(dead), errors=kinds)
