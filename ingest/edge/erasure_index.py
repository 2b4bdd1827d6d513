"""The edge's part of what an erasure must reach (``ingest.contract.erasure_index``): every
entry of Affixo's fingerprint cache it sets, filed under its visitor's ledger digest, and
every idempotency record of a keyed event it appends, filed under its event. Each is filed
in the same round trip as what it indexes, as commands of the same request
(``ingest.edge.keyed``, ``ingest.edge.routes.affixo``, ``ingest.edge.routes.batch``), or
inside the script of a guessed append (``ingest.edge.lookup``): nothing is sent later on a
request's behalf, and no reply is anyone else's.

A fingerprint entry is filed when the request knows it set it: a visitor the client sent
(``SET NX`` beside the click's append, its filing sent before it: filed whether or not the
entry was new, under that visitor, who is the click's), or a new visitor the lookup's
``SET NX`` made (filed with the click's append, once the lookup's reply showed it won; a
spooled click keeps its filing with it). A fingerprint matched mints a visitor that is
never anyone's, and files nothing: a candidate filed before its lookup would leave an index
entry of no one's for 90 days per matched click.

The digest needs the ledger's salt: read once from Postgres as the edge starts (or, with
Postgres away then, asked again by each request that would set an entry). Until it is read
the edge sets no entry (``remembered``, ``first_visitor``): one it could not file would keep
an erased visitor for its 90 days, out of the sweep's reach. A click meanwhile is matched
against the entries there are, and a fingerprint first seen then is remembered by none."""

from __future__ import annotations

import asyncio
import contextlib

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
        self._loading: asyncio.Task[None] | None = None
        if self.salt is None:
            self._load()  # as the edge starts: read before its first request, as a rule

    def remembered(self, commands: tuple[Command, ...]) -> tuple[Command, ...]:
        """``commands`` (the fingerprint cache's entries a visitor the client sent sets),
        each after its filing under its visitor (filed whether or not the entry was new);
        () until the salt is read: no entry is set that the sweep could not find."""
        if self.salt is None:
            self._load()
            return ()
        out: tuple[Command, ...] = ()
        for command in commands:
            out += self.fingerprint(command)
        return out + commands

    def first_visitor(self, key: str, candidate: str) -> Command:
        """The lookup's claim of fingerprint entry ``key`` for a new visitor ``candidate``
        (``SET NX``; its reply is then read with ``GET``); until the salt is read, a read
        alone (``EXISTS``): the entry is not set, the visitor is new and remembered by none."""
        if self.salt is None:
            self._load()
            return ("EXISTS", key)
        return ("SET", key, candidate, "NX", "EX", erasure_index.FINGERPRINT_TTL_S)

    def fingerprint(self, command: Command) -> tuple[Command, ...]:
        """The index of one entry of the fingerprint cache ``command`` sets (() for any other
        command, and until the salt is read)."""
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
        # Postgres away, or its pool closing: the next request that would set an entry asks again
        except (*PG_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, RuntimeError) as exc:
            log.warning("erasure_index.salt_unread", error=type(exc).__name__)
