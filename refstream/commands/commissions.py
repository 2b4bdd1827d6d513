"""``refstream commission``: a program's commission rules, changed (as ``PATCH
/v1/programs/{id}/commission`` does), and the ledger's newest rows; ``refstream payouts``:
an affiliate's approved commissions paid out, as the management API does."""

from __future__ import annotations

import sys
from typing import Any

import click
from pydantic import ValidationError

from ingest.contract.commission import DURATIONS
from ingest.contract.connections import create_pg_pool
from ingest.contract.errors import NotFound
from ingest.contract.settings import Settings
from ingest.ledger import placement
from ingest.manage import ledger
from ingest.manage.routes.commissions import CommissionRules
from refstream import output as out
from refstream.runner import (
    Down,
    down_line,
    each_shard,
    open_database,
    print_data,
    run_command,
    shard_urls,
    workspace_shard,
)


def _ledger(work: Any, workspace_id: str) -> None:
    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_database(settings, workspace_id)
        try:
            result: dict[str, Any] = await work(conn)
            return result
        except NotFound as exc:
            raise click.ClickException(str(exc)) from None
        except ledger.NothingToPay as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await conn.close()

    print_data(run_command(go))


@click.group()
def commission() -> None:
    """Commissions: a program's rules, and the ledger."""


@commission.command("set")
@out.json_option
@click.argument("program_id")
@click.option("--workspace", "workspace_id", required=True)
@click.option("--sale-bps", type=int, default=None, help="A share of each sale in basis points (2000 is 20%).")
@click.option(
    "--sale-flat",
    "sale_flat",
    multiple=True,
    metavar="CUR=AMOUNT",
    help="A flat amount per sale in one currency: usd=500 (minor units) or usd=5.00 (major units);"
    " repeat per currency (the given ones replace the mapping); a sale in another currency earns none.",
)
@click.option(
    "--lead-flat",
    type=int,
    default=None,
    help="A customer's lead's flat amount, once per customer, in --lead-currency's minor unit.",
)
@click.option(
    "--lead-event",
    "lead_events",
    multiple=True,
    help="A lead event name that earns --lead-flat once per customer (repeat); none: the first lead.",
)
@click.option("--lead-currency", default=None, help="ISO 4217, lower case (default usd).")
@click.option("--duration", type=click.Choice(DURATIONS), default=None, help="Which of a customer's sales earn.")
@click.option("--duration-months", type=int, default=None, help="With --duration months: within this of the lead.")
@click.option("--hold-days", type=int, default=None, help="Pending this long, then approved (default 30).")
def commission_set(program_id: str, workspace_id: str, **given: Any) -> None:
    """Change a program's commission rules; the ones not given are kept."""
    flats: tuple[str, ...] = given.pop("sale_flat")
    events: tuple[str, ...] = given.pop("lead_events")
    if flats:
        given["sale_flat"] = dict(_flat(f) for f in flats)
    if events:
        given["lead_events"] = list(events)
    try:
        rules = CommissionRules.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise click.BadParameter(f"{first['loc'][0]}: {first['msg']}") from None

    fields = rules.model_dump(exclude_none=True)
    _ledger(lambda conn: ledger.set_rules(conn, workspace_id, program_id, fields), workspace_id)


def _flat(given: str) -> tuple[str, int | str]:
    """``usd=500`` (minor units) or ``usd=5.00`` (major units, checked by the currency's exponent)."""
    code, sep, amount = given.partition("=")
    if not sep or not amount:
        raise click.BadParameter(f"{given!r}: CUR=AMOUNT, e.g. usd=500 or usd=5.00", param_hint="--sale-flat")
    return code.strip().lower(), int(amount) if amount.isdigit() else amount


@commission.command("list")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--affiliate", "affiliate_id", default=None)
@click.option("--status", type=click.Choice(("pending", "approved", "paid")), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def commission_list(workspace_id: str, affiliate_id: str | None, status: str | None, limit: int) -> None:
    """The ledger's newest rows (a reversal takes back a sale's commission: negative)."""
    filters = {k: v for k, v in (("affiliate_id", affiliate_id), ("status", status)) if v is not None}

    _ledger(lambda conn: ledger.page(conn, "commissions", workspace_id, filters, None, limit), workspace_id)


@commission.command("check")
@out.json_option
@click.option("--workspace", "workspace_id", default=None, help="One workspace's ledger [every workspace's].")
@click.option("--import-earns", is_flag=True, help="The imports ran with --commissions (their rows earn).")
def commission_check(workspace_id: str | None, import_earns: bool) -> None:
    """The ledger against the rules applied to the whole history: each sale or lead whose
    net commission differs. Exit 0 when none does, 1 otherwise. Reads only. With several
    Postgres shards, every shard's ledger (or the workspace's shard's), each difference
    with its shard; a shard that cannot be reached is named, and the exit is 1."""
    from workers.ops.ledger_check import check

    async def on(shard: Settings) -> list[dict[str, Any]]:
        pool = await create_pg_pool(shard, min_size=1, max_size=1)
        try:
            return [d.to_dict() for d in await check(pool, workspace_id, import_earns=import_earns)]
        finally:
            await pool.close()

    async def go(settings: Settings) -> tuple[dict[str, Any], str | None]:
        if workspace_id is not None:  # its shard's ledger alone
            name, there = await workspace_shard(settings, workspace_id)
            done: dict[str, Any] = {name: await on(there)}
            sharded = len(await shard_urls(settings)) > 1
        else:
            done = await each_shard(settings, on)
            sharded = len(done) > 1
        if not sharded:
            return {"differences": done[placement.DEFAULT]}, None
        found = [d | {"shard": n} for n, ds in done.items() if not isinstance(ds, Down) for d in ds]
        shards = [
            d.to_dict() if isinstance(d, Down) else {"shard": n, "reachable": True, "differences": len(d)}
            for n, d in done.items()
        ]
        return {"differences": found, "shards": shards}, down_line(done)

    result, missed = run_command(go)
    print_data(result)
    if missed:
        raise click.ClickException(f"not checked: {missed}")
    if result["differences"]:
        sys.exit(1)


@click.group()
def payouts() -> None:
    """Payouts: an affiliate's approved commissions in one currency, made and marked paid."""


@payouts.command("create")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--affiliate", "affiliate_id", required=True)
@click.option("--currency", required=True, help="ISO 4217, lower case.")
def payouts_create(workspace_id: str, affiliate_id: str, currency: str) -> None:
    """A payout of the affiliate's approved, unpaid commissions in the currency."""
    _ledger(lambda conn: ledger.create_payout(conn, workspace_id, affiliate_id, currency), workspace_id)


@payouts.command("paid")
@out.json_option
@click.argument("payout_id")
@click.option("--workspace", "workspace_id", required=True)
def payouts_paid(payout_id: str, workspace_id: str) -> None:
    """Mark a payout, and its commissions, paid."""
    _ledger(lambda conn: ledger.mark_paid(conn, workspace_id, payout_id), workspace_id)


@payouts.command("list")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--affiliate", "affiliate_id", default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def payouts_list(workspace_id: str, affiliate_id: str | None, limit: int) -> None:
    """The newest payouts."""
    filters = {"affiliate_id": affiliate_id} if affiliate_id else {}
    _ledger(lambda conn: ledger.page(conn, "payouts", workspace_id, filters, None, limit), workspace_id)
