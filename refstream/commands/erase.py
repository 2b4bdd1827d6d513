"""``refstream erase``: forget a customer everywhere (docs/privacy.md), and see what is pending.

``--customer ID --workspace W`` erases in Postgres at once (``ingest.privacy.erasure``), then
runs one sweep of Redis and the archive (``workers.ops.erasure``) and says what is left
for the workers' later sweeps: entries a consumer group has yet to read, typically.
``--status`` lists every erasure with a place pending; ``--sweep`` runs a sweep now."""

from __future__ import annotations

import uuid
from typing import Any

import click

from ingest.contract import ids, links
from ingest.contract.connections import connect_redis, create_pg_pool
from ingest.contract.errors import NotFound
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.manage import schema_check
from ingest.privacy import erasure as pg_erasure
from ingest.privacy import erasure_affiliate as affiliate_erasure
from ingest.privacy import erasure_copy, external_ids
from refstream import output as out
from refstream.runner import print_data, run_command, shard_urls, workspace_shard


async def _erase(
    settings: Settings, external_id: str | None, workspace: str | None, sweep: bool, partner: dict[str, str]
) -> dict[str, Any]:
    """The erasure on its workspace's shard, then what is pending (and ``sweep``) on every
    shard, each row and sweep with its shard's name; with one shard, ``_on_shard`` alone."""
    urls = await shard_urls(settings)
    if len(urls) == 1:
        return await _on_shard(settings, external_id, workspace, sweep, partner, next(iter(urls), "default"))
    result: dict[str, Any] = {}
    done: set[str] = set()
    if workspace is not None:  # the workspace's rows, and its erasure, are on its shard
        name, there = await workspace_shard(settings, workspace)
        result = await _on_shard(there, external_id, workspace, sweep, partner, name)
        result["shard"] = name
        result["pending"] = [p | {"shard": name} for p in result["pending"]]
        result["sweep"] = {name: result["sweep"]} if "sweep" in result else {}
        done.add(name)
    else:
        result = {"pending": [], "sweep": {}} if sweep else {"pending": []}
    result["shards"] = []
    for name, url in urls.items():
        status = await schema_check.check_url(url)
        if not status.ok:
            result["shards"].append({"shard": name, "reachable": False, "error": status.line(url)})
            continue
        result["shards"].append({"shard": name, "reachable": True})
        if name in done:
            continue
        theirs = await _on_shard(settings.model_copy(update={"database_url": url}), None, None, sweep, {}, name)
        result["pending"] += [p | {"shard": name} for p in theirs["pending"]]
        if "sweep" in theirs:
            result["sweep"][name] = theirs["sweep"]
    return result


async def _on_shard(
    settings: Settings,
    external_id: str | None,
    workspace: str | None,
    sweep: bool,
    partner: dict[str, str],
    shard: str,
) -> dict[str, Any]:
    from workers.archive.store import open_store
    from workers.ops import erasure

    keys = Keys(settings.stream_prefix, settings.partitions)
    pool = await create_pg_pool(settings, min_size=1, max_size=2)
    redis = connect_redis(settings)
    try:
        result: dict[str, Any] = {}
        if external_id is not None:
            assert workspace is not None
            if not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1)", uuid.UUID(workspace)):
                raise click.ClickException(f"no workspace {workspace}")
            async with pool.acquire() as conn:
                forms = await external_ids.subjects(conn, workspace, external_id)
            for i, form in enumerate(forms):
                done = await pg_erasure.erase(pool, workspace, form, by="cli", archive_days=settings.erase_archive_days)
                await erasure_copy.keep(pool, redis, keys, [done.id])  # outside Postgres: a restore gets it back
                for command in pg_erasure.redis_deletes(keys, done):
                    await redis.execute_command(*command)
                if i == 0:
                    result["erasure"] = done.to_dict()
                else:  # the id as given, and as an earlier version stored it
                    result.setdefault("also_erased", []).append(done.to_dict())
        if partner:  # an affiliate, or a participant (every campaign's)
            assert workspace is not None
            days = settings.erase_archive_days
            try:
                if "participant_id" in partner:  # normalized, and every spelling stored before the rule
                    gone = await external_ids.erase_participant(
                        pool, workspace, partner["participant_id"], by="cli", archive_days=days
                    )
                else:
                    gone = await affiliate_erasure.erase(pool, workspace, by="cli", archive_days=days, **partner)
            except NotFound as exc:
                raise click.ClickException(str(exc)) from None
            await erasure_copy.keep(pool, redis, keys, [uuid.UUID(e["erasure_id"]) for e in gone.erasures])
            await links.put(redis, keys, *gone.cache)
            for command in affiliate_erasure.redis_commands(keys, gone):
                await redis.execute_command(*command)
            result.update(gone.to_dict())
        if external_id is not None or partner or sweep:
            swept = await erasure.sweep(
                pool,
                redis,
                keys,
                open_store(settings),
                replicas=settings.ack_replicas,
                wait_ms=settings.ack_wait_ms,
                shard=shard,
            )
            result["sweep"] = swept.to_dict()
        result["pending"] = await erasure.status(pool)
        return result
    finally:
        await pool.close()
        await redis.aclose()


def _workspace(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a workspace id (a UUID)", param_hint="--workspace") from None


@click.command()
@out.json_option
@click.option(
    "--customer",
    "external_id",
    metavar="ID",
    help="The customer's external id (as the trackers sent it; normalized as every route does).",
)
@click.option(
    "--affiliate",
    "affiliate_id",
    metavar="ID",
    help="An affiliate's id: their name, email, external id"
    " and addresses go; their links, commissions and payouts stay.",
)
@click.option(
    "--participant",
    "participant_id",
    metavar="ID",
    help="A Bricqs participant's id: the affiliate of that external id in every campaign, erased as --affiliate"
    " (normalized as every route does).",
)
@click.option("--workspace", metavar="W", help="The workspace id the customer (or affiliate) belongs to.")
@click.option("--status", "show_status", is_flag=True, help="List the erasures with a place still pending.")
@click.option("--sweep", is_flag=True, help="Finish pending erasures in Redis and the archive now.")
def erase(
    external_id: str | None,
    affiliate_id: str | None,
    participant_id: str | None,
    workspace: str | None,
    show_status: bool,
    sweep: bool,
) -> None:
    """Erase a customer's personal data everywhere: Postgres, Redis (streams, dead letters,
    the click cache, idempotency answers), spools as they drain, and the archive.

    With several Postgres shards, the erasure is made on its workspace's shard; --status
    and --sweep go over every shard, naming each (a shard that is down is said, and the
    exit is 1).

    Counters keep their numbers; the erasure ledger (keyed digests, no personal data) makes
    every later copy of the person's events (late, replayed, imported) stored scrubbed."""
    partner = {k: v for k, v in (("affiliate_id", affiliate_id), ("participant_id", participant_id)) if v is not None}
    if len(partner) + (external_id is not None) > 1:
        raise click.UsageError("one of --customer, --affiliate, --participant at a time")
    if (external_id is not None or partner) and workspace is None:
        raise click.UsageError(
            f"--{'customer' if external_id is not None else next(iter(partner))[:-3]} needs --workspace"
        )
    if external_id is None and not partner and workspace is not None:
        raise click.UsageError("--workspace goes with --customer, --affiliate or --participant")
    if external_id is None and not partner and not show_status and not sweep:
        raise click.UsageError(
            "say what to do: --customer ID --workspace W, --affiliate ID --workspace W, --status or --sweep"
        )
    ws = _workspace(workspace)
    for given, hint in ((external_id, "--customer"), (participant_id, "--participant")):
        if given is not None:
            try:
                ids.stored_forms(given)
            except ids.InvalidId as exc:
                raise click.BadParameter(str(exc), param_hint=hint) from None
    data = run_command(lambda settings: _erase(settings, external_id, ws, sweep, partner))
    if out.wants_json():
        out.print_json(data)
    else:
        _render(data)
    if down := [f"shard {s['shard']}: {s['error']}" for s in data.get("shards", []) if not s["reachable"]]:
        raise click.ClickException(f"not listed or swept: {'; '.join(down)}")


def _render(data: dict[str, Any]) -> None:
    if "erasure" in data:
        e = data["erasure"]
        print_data(
            {"erasure": e["erasure_id"], "postgres rows scrubbed": e["postgres"], "archive due": e["archive_due"]}
        )
    for e in data.get("erasures", []):
        print_data({"erasure": e["erasure_id"], "postgres rows scrubbed": e["done"].get("postgres")})
    if "shards" in data:  # several shards: each swept (and listed), or down
        for shard in data["shards"]:
            said = "up" if shard["reachable"] else f"DOWN: {shard['error']}"
            out.console().print(f"shard {shard['shard']}: {said}", markup=False, highlight=False)
        for name, swept in data.get("sweep", {}).items():
            print_data({"shard": name, "sweep": {k: v for k, v in swept.items() if v}})
    elif "sweep" in data:
        print_data({"sweep": {k: v for k, v in data["sweep"].items() if v}})
    shard = ("shard",) if "shards" in data else ()
    columns = ("erasure", "workspace", *shard, "requested", "pending", "archive due")
    t = out.table("erasures pending", *columns, left=("erasure", "workspace", *shard, "pending"))
    for p in data["pending"]:
        due = p["archive_due"] + (" OVERDUE" if p["overdue"] else "")
        where = (p["shard"],) if shard else ()
        t.add_row(p["erasure_id"], p["workspace_id"], *where, p["requested_at"], ", ".join(p["pending"]), due)
    out.console().print(t if data["pending"] else "no erasure pending")
