"""``refstream keys``: API keys, created (shown once: only their sha256 is stored) and
revoked."""

from __future__ import annotations

from typing import Any

import click

from ingest.contract.connections import connect_redis
from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.contract.settings import seconds as settings_seconds
from ingest.edge import apikeys
from ingest.manage import admin
from refstream import output as out
from refstream.runner import open_connections, open_holding, print_data, run_command


@click.group()
def keys() -> None:
    """API keys: created (shown once) and revoked."""


_SCOPES_HELP = "read (stats, links, events), write (programs, affiliates, links, webhooks), track (events), * (all)"


@keys.command("create")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--scopes", default=None, help=f"Comma-separated, required for a workspace key: {_SCOPES_HELP}.")
@click.option("--affiliate", "affiliate_id", default=None, help="A read-only key for this affiliate only.")
@click.option("--name", default=None)
@click.option(
    "--expires-in",
    default=None,
    help="Refused from this long after now on, by every edge and the console: 3600, 90m, 12h, 30d [never].",
)
def keys_create(
    workspace_id: str, scopes: str | None, affiliate_id: str | None, name: str | None, expires_in: str | None
) -> None:
    """Create a key; prints {"api_key": ...} once: only its sha256 is stored."""
    try:
        expires_in_s = None if expires_in is None else settings_seconds(expires_in)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires-in") from None
    if expires_in_s == 0:
        raise click.BadParameter("a key's expiry must be in the future", param_hint="--expires-in")
    wanted = [s.strip() for s in (scopes or "").split(",") if s.strip()]
    if not affiliate_id:
        # no default: a key gets the powers someone chose for it, and "*" is every power
        if not wanted:
            raise click.ClickException(f"keys create needs --scopes, comma-separated, of: {_SCOPES_HELP}")
        unknown = [s for s in wanted if s not in apikeys.SCOPES]
        if unknown:
            raise click.ClickException(f"unknown scope {', '.join(map(repr, unknown))}; --scopes takes: {_SCOPES_HELP}")

    async def go(settings: Settings) -> dict[str, Any]:
        async with open_connections(settings, workspace_id) as (conn, redis):
            return await admin.create_key(
                conn,
                redis,
                Keys(settings.stream_prefix, settings.partitions),
                workspace_id=workspace_id,
                scopes=wanted,
                affiliate_id=affiliate_id,
                name=name,
                expires_in_s=expires_in_s,
            )

    try:
        print_data(run_command(go))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("revoke")
@out.json_option
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its display prefix; every edge refuses it within seconds."""

    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_holding(
            settings,
            "SELECT EXISTS (SELECT 1 FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id"
            " WHERE k.prefix = $1 AND w.moved_to IS NULL)",
            prefix,
        )
        redis = connect_redis(settings)
        try:
            return await admin.revoke_key(
                conn,
                redis,
                Keys(settings.stream_prefix, settings.partitions),
                prefix,
                replicas=settings.ack_replicas,
                wait_ms=settings.ack_wait_ms,
            )
        finally:
            await conn.close()
            await redis.aclose()

    print_data(run_command(go))
