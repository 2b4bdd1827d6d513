"""``refstream link``: referral links, created through the one way to create one
(``ingest.manage.admin``) and shown with their counters, and per day of the last 30 what
counted, what was dropped and why, and what was flagged (``ingest.manage.stats``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
import click

from ingest.contract.keys import Keys
from ingest.contract.settings import Settings
from ingest.ledger import placement
from ingest.manage import admin, stats
from refstream import output as out
from refstream.runner import open_connections, open_database, open_holding, print_data, run_command


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


@click.group()
def link() -> None:
    """Referral links."""


@link.command("create")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--code", required=True)
@click.option("--url", default=None, help="Destination; defaults to the program's URL.")
@click.option("--program", "program_id", default=None)
@click.option("--affiliate", "affiliate_id", default=None)
def link_create(
    workspace_id: str, code: str, url: str | None, program_id: str | None, affiliate_id: str | None
) -> None:
    """Create a link (a default program and affiliate when none are given)."""

    async def go(settings: Settings) -> dict[str, Any]:
        directory = await open_database(settings)
        try:
            async with open_connections(settings, workspace_id) as (conn, redis):
                return await admin.create_link(
                    conn,
                    redis,
                    Keys(settings.stream_prefix, settings.partitions),
                    workspace_id=workspace_id,
                    code=code,
                    url=url,
                    program_id=program_id,
                    affiliate_id=affiliate_id,
                    claim=lambda c, w: placement.claim_code(directory, c, w),
                )
        except asyncpg.UniqueViolationError:
            raise click.ClickException(f"a link with code {code!r} exists already") from None
        except asyncpg.DataError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await directory.close()

    print_data(run_command(go))


# a link of a workspace this database holds and has not moved away (docs/shards.md)
_LIVE_LINK = (
    "SELECT EXISTS (SELECT 1 FROM links l JOIN workspaces w ON w.id = l.workspace_id"
    " WHERE l.code = $1 AND w.moved_to IS NULL)"
)


@link.command("show")
@out.json_option
@click.argument("code")
def link_show(code: str) -> None:
    """A link with its counters; per day of the last 30, what counted, what was dropped
    and why (bot, unknown_code, rate_limited, ...), and what was flagged as fraud."""

    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_holding(settings, _LIVE_LINK, code)
        try:
            link = await admin.show_link(conn, code)
            start, to = stats.day_range(None, None)
            link["stats"] = await stats.per_day(conn, [UUID(link["id"])], start, to)
            return link
        finally:
            await conn.close()

    data = run_command(go)
    if out.wants_json():
        print_data(data)
        return
    per_day = data.pop("stats")
    print_data(data)
    t = out.table(
        f"{code}: {per_day['from']} to {per_day['to']} (UTC)",
        "day",
        "clicks",
        "leads",
        "conversions",
        "dropped",
        "flagged",
        left=("day", "dropped", "flagged"),
    )
    for d in [*per_day["daily"], {"day": "total", **per_day["totals"]}]:
        t.add_row(
            out.cell(d["day"]),
            out.cell(d["clicks"]),
            out.cell(d["leads"]),
            out.cell(d["conversions"]),
            out.cell(_reasons(d["dropped"])),
            out.cell(_reasons(d["flagged"])),
        )
    out.console().print(t)
