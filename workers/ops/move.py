"""A workspace moved from one shard to another under live load (docs/shards.md, "Moving a
workspace"): copy, catch up, fence, switch; the old copy dropped only on a later step.

- **copy**: every row of the workspace, table by table in the order of their foreign keys,
  read in one snapshot of the source and written to the target (a row there already is
  kept: a second run after a crash goes on where the first stopped).
- **catch up**: the rows written or changed since the last copy's snapshot: each row whose
  ``xmin`` is no older than the oldest transaction that snapshot did not see, written over
  the target's.
- **fence**: the directory marks the workspace fenced (a process asking for its pool
  waits), and on the source an exclusive advisory lock waits out every transaction that
  holds the workspace's shared one (a batch of the workers, a write of the management API)
  before ``workspaces.moved_to`` is set: from its commit on, no transaction writes the
  workspace's rows there (``fence_check``). The click_burst rule's pending clicks there are
  judged first.
- **final catch up**, under the fence: the changes since the last snapshot, rows the source
  deleted since deleted on the target (by primary key: the append-only tables keep theirs),
  the workspace's erasures applied again on the target, and the target's sequences moved
  past the source's (the link cache's versions, the ledger's order).
- **switch**: the directory places the workspace on the target and lifts the fence. Until
  the final catch up, the target's copy is marked as arriving (``ARRIVING`` in its
  ``moved_to``), so that no write lands there before the switch.

Every step is recorded in ``workspace_moves`` (the directory), so the command started again
after a crash takes up the step it was on. The tables and how a row belongs to a workspace
are read from the catalogue: a table added later is moved, or refused by name.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

import asyncpg
import structlog

from ingest.contract import erasure
from ingest.contract.errors import Misconfigured
from ingest.ledger.placement import fence_key
from ingest.privacy import erasure_late
from workers.consumer import burst_pass
from workers.ops import move_write

log = structlog.get_logger("workers.move")

CHUNK = 2_000
# ``workspaces.moved_to`` of a move's target while its copy is made: a writer whose map sends
# it there before the switch (an import holds its shard for as long as it runs) meets the
# fence there as on a moved-away copy; the catch ups would delete, or write over, what it
# wrote (the generative test's seed 1972980936: an import's clicks stored with no unique
# visitor and no count)
ARRIVING = "(arriving)"
# the directory's, the bookkeeping's, and the dictionaries every workspace's rows share
# (event_agents, event_devices, event_places: an event's ids are translated into the target's)
NOT_A_WORKSPACES = frozenset(
    {
        "shards",
        "workspace_shards",
        "link_codes",
        "workspace_moves",
        "refstream_schema",
        "erasure_salt",
        "event_retention",
        "drop_folds",
        "suppression_horizon",
        "suppression_changes",  # the edges' feed: the target's trigger writes the moved rows' own
        "burst_pending",  # judged on the source before the last copy
        "event_agents",
        "event_devices",
        "event_places",
    }
)
# rows no one deletes but the retention (which each shard runs on its own): never compared
# (an erasure rewrites an event in place; it deletes and writes again its unique visitors,
# dedupe keys and drops, which are compared)
APPEND_ONLY = frozenset({"events", "import_clicks"})
# an event's ids in the shared dictionaries: (column, dictionary, its unique content columns)
DICTIONARIES = (
    ("agent_id", "event_agents", ("digest", "ua")),
    ("device_id", "event_devices", ("doc",)),
    ("place_id", "event_places", ("doc",)),
)


class MoveError(Misconfigured, RuntimeError):
    """A move that cannot go on as asked: the operator's to mend (the message says how)."""


@dataclass(slots=True)
class Table:
    name: str
    columns: list[str]
    key: list[str]  # the primary key's columns (empty: none)
    where: str  # the workspace's rows, $1 its id
    fixed: frozenset[str] = frozenset()  # GENERATED ALWAYS AS IDENTITY: written once, never set again
    parents: set[str] = field(default_factory=set)


_TABLES = """
SELECT c.oid, c.relname AS name,
       array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum) AS columns,
       array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped AND a.attidentity = 'a') AS fixed,
       coalesce((SELECT array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
                              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.n ORDER BY u.i)
                 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p'), '{}') AS key
FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""
_FOREIGN = """
SELECT k.conrelid::regclass::text AS child, k.confrelid::regclass::text AS parent,
       array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i) AS cols,
       array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i) AS refs
FROM pg_constraint k
WHERE k.contype = 'f' AND k.connamespace = current_schema()::regnamespace
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = k.conrelid AND c.relispartition)
"""


async def plan(conn: asyncpg.Connection) -> list[Table]:
    """Every table that holds a workspace's rows, parents before children, each with how its
    rows are found; ``MoveError`` for a table none of the ways reaches."""
    foreign = await conn.fetch(_FOREIGN)
    tables: dict[str, Table] = {}
    pending: dict[str, Any] = {}
    rows = await conn.fetch(_TABLES)
    for r in rows:
        if r["name"] in NOT_A_WORKSPACES:
            continue
        columns = list(r["columns"])
        if r["name"] == "workspaces":  # where it moved to is the source's alone
            tables["workspaces"] = Table(
                "workspaces", [c for c in columns if c != "moved_to"], list(r["key"]), "id = $1"
            )
        elif "workspace_id" in columns:
            tables[r["name"]] = Table(r["name"], columns, list(r["key"]), "workspace_id = $1")
        else:
            pending[r["name"]] = r
    while pending:  # a table reached through a parent's foreign key
        reached = False
        for name, r in list(pending.items()):
            via = next((f for f in foreign if f["child"] == name and f["parent"] in tables), None)
            if via is None and "link_id" in r["columns"] and "links" in tables:
                # keyed by a link alone, with no foreign key (a lookup saved on every insert)
                via = {"parent": "links", "cols": ["link_id"], "refs": ["id"]}
            if via is None:
                continue
            parent = tables[via["parent"]]
            cols, refs = ", ".join(via["cols"]), ", ".join(via["refs"])
            where = f"({cols}) IN (SELECT {refs} FROM {parent.name} WHERE {parent.where})"
            tables[name] = Table(name, list(r["columns"]), list(r["key"]), where)
            del pending[name]
            reached = True
        if not reached:
            raise MoveError(f"no way to tell a workspace's rows in {', '.join(sorted(pending))}")
    for f in foreign:
        if f["child"] in tables and f["parent"] in tables and f["child"] != f["parent"]:
            tables[f["child"]].parents.add(f["parent"])
    for r in rows:
        if r["name"] in tables:
            tables[r["name"]].fixed = frozenset(r["fixed"])
    return _ordered(tables)


def _ordered(tables: dict[str, Table]) -> list[Table]:
    done: list[Table] = []
    seen: set[str] = set()

    def visit(t: Table) -> None:
        if t.name in seen:
            return
        seen.add(t.name)
        for p in sorted(t.parents):
            visit(tables[p])
        done.append(t)

    for t in sorted(tables.values(), key=lambda t: t.name != "workspaces"):
        visit(t)
    return done


@dataclass(slots=True)
class Mover:
    """One workspace's move from ``source`` to ``target`` (connections to each, outside a
    transaction), told by ``progress``."""

    workspace_id: UUID
    source: asyncpg.Connection
    target: asyncpg.Connection
    progress: Callable[[str, int], None] = lambda table, rows: None
    tables: list[Table] = field(default_factory=list)
    _dicts: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))

    async def copy(self, since_xid: int | None, *, forget: bool = True) -> tuple[int, int]:
        """The workspace's rows (``since_xid``: those written or changed since then) from a
        snapshot of the source to the target, and (``forget``) the target's rows of the
        workspace the source no longer holds deleted there; (rows written, the next copy's
        start)."""
        if not self.tables:
            self.tables = await plan(self.source)
        written = 0
        async with self.source.transaction(isolation="repeatable_read", readonly=True):
            snapshot_xmin: int = await self.source.fetchval(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            )
            # the source's deletions, children first: a first copy taken up again after a crash
            # finds its first run's rows on the target, some since deleted on the source
            if forget:
                for t in reversed(self.tables):
                    await self._forget_deleted(t)
            for t in self.tables:
                n = await self._copy_table(t, since_xid)
                written += n
                self.progress(t.name, n)
        return written, snapshot_xmin

    async def _forget_deleted(self, t: Table) -> None:
        """The target's rows of the workspace that the source's snapshot no longer holds,
        deleted (by primary key; the append-only tables keep theirs): before the changed
        rows are written, so that one made again under a new key meets no old one."""
        if t.name in APPEND_ONLY or not t.key:
            return
        keys = ", ".join(f'"{c}"' for c in t.key)
        listed = f'SELECT {keys} FROM "{t.name}" WHERE {t.where}'
        held = [tuple(r) for r in await self.target.fetch(listed, self.workspace_id)]
        if not held:  # a first copy's target: nothing to forget, the source's keys not read
            return
        theirs = {tuple(r) for r in await self.source.fetch(listed, self.workspace_id)}
        gone = [key for key in held if key not in theirs]
        match = " AND ".join(f'"{c}" = ${i + 1}' for i, c in enumerate(t.key))
        for key in gone:
            await self.target.execute(f'DELETE FROM "{t.name}" WHERE {match}', *key)

    async def _copy_table(self, t: Table, since_xid: int | None) -> int:
        where = t.where
        args: list[Any] = [self.workspace_id]
        if since_xid is not None:  # changed since: xmin no older than the oldest unseen then
            where += " AND age(xmin) <= age(($2::bigint % 4294967296)::text::xid)"
            args.append(since_xid)
        cols = ", ".join(f'"{c}"' for c in t.columns)
        n = 0
        async with self.target.transaction():
            await self.target.execute(f'CREATE TEMP TABLE _moving (LIKE "{t.name}") ON COMMIT DROP')
            chunk: list[list[Any]] = []
            async for row in self.source.cursor(f'SELECT {cols} FROM "{t.name}" WHERE {where}', *args, prefetch=CHUNK):
                chunk.append(list(row.values()))
                if len(chunk) >= CHUNK:
                    n += await self._stage(t, chunk)
                    chunk = []
            if chunk:
                n += await self._stage(t, chunk)
            if n:
                await move_write.write(self.target, t, MoveError)
            if t.name == "workspaces":  # in the transaction that wrote it: no write lands here before the switch
                await self.target.execute(
                    "UPDATE workspaces SET moved_to = $2 WHERE id = $1 AND moved_to IS NULL",
                    self.workspace_id,
                    ARRIVING,
                )
        return n

    async def _stage(self, t: Table, rows: list[list[Any]]) -> int:
        """A chunk of the table's rows into ``_moving`` (``move_write`` writes them all at once)."""
        if t.name == "events":
            await self._translate(t, rows)
        await self.target.copy_records_to_table("_moving", records=rows, columns=t.columns)
        return len(rows)

    async def _translate(self, t: Table, rows: list[list[Any]]) -> None:
        """An event's ids in the source's dictionaries made the target's (each entry written
        there by its content when it is not there yet)."""
        for column, dictionary, unique in DICTIONARIES:
            if column not in t.columns:
                continue
            i = t.columns.index(column)
            known = self._dicts[dictionary]
            wanted = sorted({r[i] for r in rows if r[i] is not None and r[i] not in known})
            if wanted:
                found = await self.source.fetch(
                    f"SELECT id, {', '.join(unique)} FROM {dictionary} WHERE id = ANY($1::int[])", wanted
                )
                for entry in found:
                    values = [entry[c] for c in unique]
                    marks = ", ".join(f"${k + 1}" for k in range(len(unique)))
                    known[entry["id"]] = await self.target.fetchval(
                        f"INSERT INTO {dictionary} ({', '.join(unique)}) VALUES ({marks})"
                        f" ON CONFLICT ({unique[0]}) DO UPDATE SET {unique[0]} = EXCLUDED.{unique[0]} RETURNING id",
                        *values,
                    )
            for r in rows:
                if r[i] is not None:
                    r[i] = known.get(r[i])

    async def fence(self, target_name: str) -> None:
        """On the source: wait out every transaction that may write the workspace's rows,
        then mark them moved; the click_burst rule's pending clicks judged first."""
        await self.source.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", fence_key(self.workspace_id))
        try:
            await self.source.execute(
                "UPDATE workspaces SET moved_to = $2 WHERE id = $1", self.workspace_id, target_name
            )
        finally:
            await self.source.execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))", fence_key(self.workspace_id)
            )
        # a pass judges every workspace's clicks: none of ours is left unjudged on the source
        await burst_pass.run_until_done(cast(asyncpg.Pool, _Single(self.source)), passes=1_000)

    async def finish(self, since_xid: int | None) -> int:
        """Under the fence: the last changes, the source's deletions, the erasures applied
        again, the target's sequences past the source's. The rows written.

        The last copy is made once: a run taken up after the target's copy was opened (its
        ``moved_to`` no longer ``ARRIVING``) goes on from there. The target's erasure work
        since (``_erasures_again``, its sweep) rewrote rows the frozen source still holds
        raw; a copy again would have deleted their renamed visitors and left their events
        renamed (the generative test's seed 465957242: a click with no unique visitor)."""
        written = 0
        if not await opened(self.target, self.workspace_id):
            written, _ = await self.copy(since_xid)
            # the target's copy is whole: its own from now on
            await self.target.execute("UPDATE workspaces SET moved_to = NULL WHERE id = $1", self.workspace_id)
        await self._sequences()
        await self._erasures_again()
        return written

    async def _sequences(self) -> None:
        """Each sequence of the target moved past the source's (the link cache's versions:
        a link changed on the target must outrank its entry the source wrote)."""
        listed = "SELECT relname FROM pg_class WHERE relkind = 'S' AND relnamespace = current_schema()::regnamespace"
        theirs = {r["relname"] for r in await self.source.fetch(listed)}
        for r in await self.target.fetch(listed):
            if r["relname"] not in theirs:
                continue
            name = r["relname"]
            last = await self.source.fetchval(f'SELECT last_value FROM "{name}"')
            await self.target.execute(f'SELECT setval($1, greatest((SELECT last_value FROM "{name}"), $2))', name, last)

    async def _erasures_again(self) -> None:
        """Each erasure of the workspace applied again on the target: a row an erasure
        scrubbed on the source while it was being copied is scrubbed here too."""
        rows = await self.target.fetch(
            "SELECT min(coalesce(since, requested_at)) AS since FROM erasures WHERE workspace_id = $1",
            self.workspace_id,
        )
        since = rows[0]["since"] if rows else None
        if since is None:
            return
        key = await erasure.salt(self.target)
        await erasure_late.recheck(cast(asyncpg.Pool, _Single(self.target)), key, str(self.workspace_id), since)


async def opened(target: asyncpg.Connection, workspace_id: UUID) -> bool:
    """Whether a move's last copy opened the target's copy of the workspace (its mark lifted);
    False where it is still arriving, or not copied there at all."""
    return bool(await target.fetchval("SELECT moved_to IS NULL FROM workspaces WHERE id = $1", workspace_id))


class _Single:
    """A pool's face over one connection (what ``burst_pass`` and ``erasure_late`` take)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    def acquire(self) -> _Held:
        return _Held(self.conn)

    async def execute(self, *args: Any) -> Any:
        return await self.conn.execute(*args)

    async def fetch(self, *args: Any) -> Any:
        return await self.conn.fetch(*args)

    async def fetchval(self, *args: Any) -> Any:
        return await self.conn.fetchval(*args)


class _Held:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> asyncpg.Connection:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 3)


__all__ = ["MoveError", "Mover", "opened", "plan"]
