"""``refstream workspace``: ``create``, a workspace and its first API key;
``set-bot-policy``: how the workers count a workspace's bot clicks; ``set-fraud-policy``:
what a fraud flag does to the event it is on; ``delete``: a workspace and everything it
owns.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import click

from ingest.contract.errors import NotFound
from ingest.contract.fraud import FRAUD_POLICIES, FRAUD_RULES
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import directory as directory_mod
from ingest.ledger import placement
from ingest.manage import admin, deletion
from refstream import output as out
from refstream.commands.move import move
from refstream.runner import open_connections, open_database, print_data, run_command


@click.group()
def workspace() -> None:
    """Workspaces."""


@workspace.command("create")
@out.json_option
@click.argument("name")
@click.option(
    "--shard", help="The shard to place it on (`refstream shards list`); default: the one with fewest workspaces."
)
def workspace_create(name: str, shard: str | None) -> None:
    """Create a workspace and its first API key (scope *); the key is shown once."""

    async def go(settings: Settings) -> dict[str, str]:
        conn = await open_database(settings)
        try:
            if shard is None and not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM shards)"):
                return await admin.create_workspace(conn, name)  # one Postgres: no map to write
            try:
                chosen = await directory_mod.choose(conn, shard)
            except placement.ShardError as exc:
                raise click.ClickException(str(exc)) from None
            ws = uuid.uuid4()
            await directory_mod.place(conn, ws, chosen)  # before its first row, wherever that is
            if chosen == placement.DEFAULT:
                made = await admin.create_workspace(conn, name, ws)
            else:
                url = (await directory_mod.shard_dsns(conn, settings.secret_key))[chosen]
                there = await asyncpg.connect(url, timeout=settings.connect_timeout_s)
                try:
                    made = await admin.create_workspace(there, name, ws)
                finally:
                    await there.close()
            return {**made, "shard": chosen}
        finally:
            await conn.close()

    print_data(run_command(go))


@workspace.command("delete")
@click.argument("workspace_id")
@click.option("--yes", is_flag=True, help="Delete without asking (scripts).")
@out.json_option
def delete(workspace_id: str, yes: bool) -> None:
    """Delete a workspace and everything it owns: programs, affiliates, links, keys, events,
    customers, sales, commissions, its erasure ledger and its do-not-track lists; its keys
    and links are refused by every edge at once. Another workspace's data, erasures of
    people with the same ids included, is untouched. There is no undo."""
    if not yes:
        click.confirm(f"Delete workspace {workspace_id} and all its data, for good?", abort=True)

    async def forget(settings: Settings, workspace: uuid.UUID) -> None:
        directory = await open_database(settings)
        try:  # where it was, and its links' codes: free for another workspace
            await directory_mod.forget(directory, workspace)
        finally:
            await directory.close()

    async def go(settings: Settings) -> dict[str, Any]:
        try:
            async with open_connections(settings, workspace_id) as (conn, redis):
                done = await deletion.delete_workspace(
                    conn,
                    redis,
                    Keys(settings.stream_prefix, settings.partitions),
                    workspace_id,
                    replicas=settings.ack_replicas,
                    wait_ms=settings.ack_wait_ms,
                )
        except NotFound:
            # gone from its shard, maybe by a delete whose directory half failed (the
            # directory away after the shard's commit): that half is done now, and the
            # answer is "not found" all the same
            if (workspace := _uuid(workspace_id)) is not None:
                await forget(settings, workspace)
            raise
        await forget(settings, uuid.UUID(workspace_id))
        return done

    print_data(run_command(go))


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


@workspace.command("set-bot-policy")
@click.argument("workspace_id")
@click.argument("policy", type=click.Choice(admin.BOT_POLICIES))
@out.json_option
def set_bot_policy(workspace_id: str, policy: str) -> None:
    """How the workers count this workspace's bot clicks (crawlers, HTTP clients such as
    curl, headless browsers, datacenter networks):

    \b
      exclude  the default: counted apart, in bot_clicks only, never as clicks
      count    as clicks too, unique clicks included (bio.re's counter has no bot filter)

    Either way the event is stored flagged is_bot and counted in bot_clicks. Applies to
    the clicks the workers store from now on; `refstream reconcile` keeps what was
    decided for each stored click."""

    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_database(settings, workspace_id)
        try:
            return await admin.update_workspace(conn, workspace_id, bot_policy=policy)
        finally:
            await conn.close()

    ws = run_command(go)
    if out.wants_json():
        out.print_json(ws)
        return
    table = out.table("workspace", "field", "value", left=("field", "value"))
    for name in ("id", "name", "bot_policy", "ip_policy"):
        table.add_row(name.replace("_", " "), out.cell(ws[name]))
    out.console().print(table)


@workspace.command("set-fraud-policy")
@click.argument("workspace_id")
@click.argument("rule", type=click.Choice(FRAUD_RULES))
@click.argument("policy", type=click.Choice(FRAUD_POLICIES))
@out.json_option
def set_fraud_policy(workspace_id: str, rule: str, policy: str) -> None:
    """What a fraud flag under RULE does to the event (see docs/operations.md, Fraud flags):

    \b
      flag     the default: stored with the flag and its evidence, and still counted
      exclude  stored with the flag; it moves no counter and credits no affiliate

    Either way the flag is counted in the stats and sent as fraud.flagged. Applies to
    the events the workers store from now on."""

    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_database(settings, workspace_id)
        try:
            return await admin.update_workspace(conn, workspace_id, bot_policy=None, fraud_policy={rule: policy})
        finally:
            await conn.close()

    ws = run_command(go)
    if out.wants_json():
        out.print_json(ws)
        return
    table = out.table("workspace", "field", "value", left=("field", "value"))
    for name in ("id", "name", "bot_policy", "fraud_policy"):
        table.add_row(name.replace("_", " "), out.cell(ws[name] if name != "fraud_policy" else str(ws[name] or "{}")))
    out.console().print(table)


workspace.add_command(move)
