"""``refstream workspace move WS --to SHARD``: a workspace moved to another shard under live
load (``workers.ops.move``: copy, catch up, fence, switch), each step recorded in the
directory's ``workspace_moves`` so that the command run again after a crash takes up the
step it was on; ``--drop-old`` deletes the old copy, once the move has switched."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

import asyncpg
import click

from ingest.contract.connections import write
from ingest.contract.settings import Settings
from ingest.ledger import directory as directory_mod
from ingest.ledger import placement
from ingest.manage import deletion, schema_check
from refstream import output as out
from refstream.runner import open_database, print_data, run_command
from workers.ops.move import MoveError, Mover, opened

CATCH_UPS = 2  # copies after the first, while the workspace is live: the fence's copy stays small


async def _url(directory: asyncpg.Connection, settings: Settings, shard: str) -> str:
    if shard == placement.DEFAULT:
        return settings.database_url
    dsns = await directory_mod.shard_dsns(directory, settings.secret_key)
    if shard not in dsns:
        raise click.ClickException(f"no shard named {shard!r}: `refstream shards list` shows them")
    return dsns[shard]


def _progress(step: str) -> Any:
    def told(table: str, rows: int) -> None:
        if rows:
            print(f"{step}: {table} {rows:,} rows", file=sys.stderr, flush=True)

    return told


async def _record(directory: asyncpg.Connection, ws: uuid.UUID, **changes: Any) -> None:
    sets = ", ".join(f"{k} = ${i + 2}" for i, k in enumerate(changes))
    await directory.execute(
        f"UPDATE workspace_moves SET {sets}, updated_at = now() WHERE workspace_id = $1", ws, *changes.values()
    )


async def _begin(directory: asyncpg.Connection, ws: uuid.UUID, to: str, target_url: str) -> asyncpg.Record:
    """The move's record: the one under way (it must be to ``to``), else a new one."""
    held = await directory.fetchrow("SELECT * FROM workspace_moves WHERE workspace_id = $1", ws)
    if held is not None and held["state"] in ("copying", "fenced"):
        if held["target"] != to:
            raise click.ClickException(f"a move to {held['target']!r} is under way: run it to its end first")
        return held
    source = await directory.fetchval("SELECT shard FROM workspace_shards WHERE workspace_id = $1", ws)
    if held is not None and held["state"] == "switched":
        if held["target"] == to and source == to:  # run again after it switched (its answer lost): done
            return held
        raise click.ClickException("the last move left its old copy: `workspace move --drop-old` first")
    source = source or placement.DEFAULT
    if source == to:
        raise click.ClickException(f"the workspace is on {to!r} already")
    there = await asyncpg.connect(target_url, timeout=schema_check.CONNECT_TIMEOUT_S)
    try:
        if await there.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1)", ws):
            raise click.ClickException(f"shard {to!r} holds a copy of the workspace already: drop it first")
    finally:
        await there.close()
    await directory_mod.place(directory, ws, source)  # written down, wherever it was
    await directory.execute("DELETE FROM workspace_moves WHERE workspace_id = $1", ws)
    row = await directory.fetchrow(
        "INSERT INTO workspace_moves (workspace_id, source, target) VALUES ($1, $2, $3) RETURNING *", ws, source, to
    )
    assert row is not None
    return row


async def _move(settings: Settings, ws: uuid.UUID, to: str) -> dict[str, Any]:
    started = time.monotonic()
    directory = await open_database(settings)
    try:
        target_url = await _url(directory, settings, to)
        held = await _begin(directory, ws, to, target_url)
        if held["state"] == "switched":
            return _switched(held, fence_s=None, copied=held["copied"], started=started)
        source_url = await _url(directory, settings, held["source"])
        source = await asyncpg.connect(source_url, timeout=schema_check.CONNECT_TIMEOUT_S)
        target = await asyncpg.connect(target_url, timeout=schema_check.CONNECT_TIMEOUT_S)
        try:
            mover = Mover(ws, source, target)
            state, since = held["state"], held["since_xid"]
            if state == "copying":
                for step in range(1 + CATCH_UPS):
                    mover.progress = _progress("copy" if since is None else f"catch up {step}")
                    n, since = await mover.copy(since)
                    await directory.execute(
                        "UPDATE workspace_moves SET since_xid = $2, copied = copied + $3, updated_at = now()"
                        " WHERE workspace_id = $1",
                        ws,
                        since,
                        n,
                    )
                await directory_mod.fence(directory, ws, True)
                await _record(directory, ws, state="fenced")
            fenced_at = time.monotonic()
            # every process reads the directory within REFRESH_S: from then on, each waits on
            # the fence for the workspace's pool, and the workers meet it on the source
            await asyncio.sleep(2 * placement.REFRESH_S)
            mover.progress = _progress("fenced")
            await mover.fence(to)
            n = await mover.finish(since)
            await directory_mod.fence(directory, ws, False, shard=to)
            await _record(directory, ws, state="switched")
            fence_s = round(time.monotonic() - fenced_at, 3)
        finally:
            await source.close()
            await target.close()
        copied = await directory.fetchval("SELECT copied FROM workspace_moves WHERE workspace_id = $1", ws)
        return _switched(held, fence_s=fence_s, copied=copied + n, started=started)
    except MoveError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        await directory.close()


def _switched(held: asyncpg.Record, *, fence_s: float | None, copied: int, started: float) -> dict[str, Any]:
    return {
        "workspace_id": str(held["workspace_id"]),
        "from": held["source"],
        "to": held["target"],
        "state": "switched",
        "rows_copied": copied,
        "fence_s": fence_s,
        "seconds": round(time.monotonic() - started, 3),
    }


_SINCE_SWITCH = "SELECT extract(epoch FROM now() - updated_at)::float8 FROM workspace_moves WHERE workspace_id = $1"


async def _drop_old(settings: Settings, ws: uuid.UUID) -> dict[str, Any]:
    directory = await open_database(settings)
    try:
        held = await directory.fetchrow("SELECT * FROM workspace_moves WHERE workspace_id = $1", ws)
        if held is None or held["state"] != "switched":
            raise click.ClickException("no switched move of this workspace: its old copy is not known")
        placed = await directory.fetchval("SELECT shard FROM workspace_shards WHERE workspace_id = $1", ws)
        if placed != held["target"]:
            raise click.ClickException(f"the directory places it on {placed!r}, not {held['target']!r}: not dropped")
        # a process reads the map at most every REFRESH_S: two after the switch, none routes
        # by a map from before it, so none looks for the workspace on the copy about to go
        # (a link lookup answered "no such link" between a switch and a drop at once: seed 562805026)
        since = await directory.fetchval(_SINCE_SWITCH, ws)
        await asyncio.sleep(max(0.0, 2 * placement.REFRESH_S - since))
        old = await asyncpg.connect(
            await _url(directory, settings, held["source"]), timeout=schema_check.CONNECT_TIMEOUT_S
        )
        try:
            async with write(old):
                mark = await old.fetchrow("SELECT moved_to FROM workspaces WHERE id = $1", ws)
                if mark is None:  # dropped already (by a run that could not record it): nothing is left
                    deleted: dict[str, int] = {}
                elif mark["moved_to"] is None:
                    raise click.ClickException("the old copy is not marked moved: not dropped")
                else:
                    deleted = await deletion.delete_rows(old, ws)
        finally:
            await old.close()
        after = await directory.fetchval(_SINCE_SWITCH, ws)
        await _record(directory, ws, state="dropped")
        return {"workspace_id": str(ws), "dropped_from": held["source"], "deleted": deleted, "after_switch_s": after}
    finally:
        await directory.close()


async def _abort(settings: Settings, ws: uuid.UUID) -> dict[str, Any]:
    """A move not yet switched, undone: the fence lifted, the source's rows writable again,
    the target's partial copy deleted; the workspace stays where it was."""
    directory = await open_database(settings)
    try:
        held = await directory.fetchrow("SELECT * FROM workspace_moves WHERE workspace_id = $1", ws)
        if held is None or held["state"] not in ("copying", "fenced"):
            raise click.ClickException("no move of this workspace is under way: nothing to abort")
        placed = await directory.fetchval("SELECT shard FROM workspace_shards WHERE workspace_id = $1", ws)
        if placed != held["source"]:
            raise click.ClickException(f"the directory places it on {placed!r}: the move switched, not aborted")
        source = await asyncpg.connect(
            await _url(directory, settings, held["source"]), timeout=schema_check.CONNECT_TIMEOUT_S
        )
        target = await asyncpg.connect(
            await _url(directory, settings, held["target"]), timeout=schema_check.CONNECT_TIMEOUT_S
        )
        try:
            # past its last copy, the target is the whole workspace, and its erasure work since
            # may hold what the frozen source does not: only the switch goes on from there
            if await opened(target, ws):
                raise click.ClickException(
                    "the move made its last copy: the target holds the whole workspace; run the move again to switch"
                )
            await source.execute("UPDATE workspaces SET moved_to = NULL WHERE id = $1", ws)
            await directory_mod.fence(directory, ws, False)
            async with write(target):
                deleted = await deletion.delete_rows(target, ws)
        finally:
            await source.close()
            await target.close()
        await _record(directory, ws, state="aborted")
        return {"workspace_id": str(ws), "on": held["source"], "aborted": held["state"], "deleted": deleted}
    finally:
        await directory.close()


@click.command("move")
@click.argument("workspace_id")
@click.option("--to", "to", help="The shard to move it to (`refstream shards list`).")
@click.option("--drop-old", is_flag=True, help="Delete the old copy a switched move left behind.")
@click.option("--abort", is_flag=True, help="Undo a move not yet switched: the workspace stays where it was.")
@out.json_option
def move(workspace_id: str, to: str | None, drop_old: bool, abort: bool) -> None:
    """Move a workspace to another shard under live load: copy, catch up, fence, switch.
    Its events wait in the streams while fenced (seconds); nothing is lost or counted twice.
    Run again after a crash: it takes up the step it was on. The old copy stays, frozen and
    read by no one, until `--drop-old` deletes it."""
    try:
        ws = uuid.UUID(workspace_id)
    except ValueError:
        raise click.BadParameter(f"{workspace_id!r} is not a workspace id (a UUID)") from None
    if (to is not None) + drop_old + abort != 1:
        raise click.UsageError("say one of --to SHARD, --drop-old (after a move) or --abort (before its switch)")
    if abort:
        print_data(run_command(lambda settings: _abort(settings, ws)))
    elif drop_old:
        print_data(run_command(lambda settings: _drop_old(settings, ws)))
    else:
        assert to is not None
        print_data(run_command(lambda settings: _move(settings, ws, to)))
