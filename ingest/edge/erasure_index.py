"""The edge's part of what an erasure must reach (``ingest.contract.erasure_index``): every
entry of Affixo's fingerprint cache it sets, filed under its visitor's ledger digest, and
every idempotency record of a keyed event it appends, filed under its event, whichever route
or path wrote them: once Redis answered (the micro-batcher's ``after``: filed in the next
round trip, so what a request wrote that changed nothing files nothing), and for a guessed
append's writes in its own script (``ingest.edge.lookup``).

The digest needs the ledger's salt: read once from Postgres as the edge starts (or, with
Postgres away then, when an entry is written; until it is read, the entries written go
unfiled: they keep until their own expiry, as every entry did before the index)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog

from ingest.contract import erasure, erasure_index
from ingest.contract.connections import PG_ERRORS, Command
from ingest.contract.keys import Keys

log = structlog.get_logger("edge.erasure_index")


class ErasureIndex:
    def __init__(self, keys: Keys, pg: asyncpg.Pool) -> None:
        self.keys = keys
        self.pg = pg
        self.salt: bytes | None = erasure.known_salt()
        self._head = f"{keys.prefix}:fp:"
        self._loading: asyncio.Task[None] | None = None
        if self.salt is None:
            self._load()  # as the edge starts: read before its first request, as a rule

    def after(self, commands: tuple[Command, ...], replies: list[Any]) -> tuple[Command, ...]:
        """What files what ``commands`` wrote, once Redis answered them (``RedisBatcher.after``):
        a keyed append that appended (``erasure_index.Filed``: its record under its event),
        an entry of the fingerprint cache that was set (under its visitor). What wrote
        nothing (a repeat's script, a ``SET NX`` that found a visitor) files nothing: a
        fingerprint matched mints a visitor that is never anyone's."""
        out: tuple[Command, ...] = ()
        for command, reply in zip(commands, replies, strict=False):
            if isinstance(command, erasure_index.Filed):
                if reply is None:  # the script appended (a repeat's answer is its record's bytes)
                    out += command.beside
            elif command[0] == "SET" and isinstance(name := command[1], str) and name.startswith(self._head):
                if reply is not None and not isinstance(reply, Exception):
                    out += self.fingerprint(command)
        return out

    def beside(self, commands: tuple[Command, ...]) -> tuple[Command, ...]:
        """The fingerprint cache's index of each entry ``commands`` set, for writes a script
        runs with its append (``ingest.edge.lookup``: a guessed append's, a visitor the
        client sent, so filed whether or not the entry was new)."""
        out: tuple[Command, ...] = ()
        for command in commands:
            if command[0] == "SET" and isinstance(name := command[1], str) and name.startswith(self._head):
                out += self.fingerprint(command)
        return out

    def fingerprint(self, command: Command) -> tuple[Command, ...]:
        """The index of one entry of the fingerprint cache ``command`` sets (() until the
        salt is read)."""
        if self.salt is None:
            self._load()
            return ()
        return erasure_index.fingerprint_commands(self.keys, self.salt, command)

    def _load(self) -> None:
        if self._loading is not None and not self._loading.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next write asks again
            self._loading = asyncio.get_running_loop().create_task(self._read(), name="erasure-salt")

    async def _read(self) -> None:
        try:
            async with self.pg.acquire() as conn:
                self.salt = await erasure.salt(conn)
        except (*PG_ERRORS, asyncpg.PostgresError, RuntimeError) as exc:  # Postgres away: the next write asks again
            log.warning("erasure_index.salt_unread", error=type(exc).__name__)
