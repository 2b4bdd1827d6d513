"""``refstream commission``: a program's commission rules, changed (as ``PATCH
/v1/programs/{id}/commission`` does), and the ledger's newest rows; ``refstream payouts``:
an affiliate's approved commissions paid out, as the management API does."""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from ingest.contract.commission import DURATIONS
from ingest.contract.settings import Settings
from ingest.manage import ledger
from ingest.manage.admin import NotFound
from ingest.manage.routes.commissions import CommissionRules

from . import ops_output as out
from .runner import open_database, print_data, run_command


def _ledger(work: Any) -> None:
    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_database(settings)
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
@click.option("--sale-flat", type=int, default=None, help="A flat amount per sale, in the sale's minor unit.")
@click.option("--lead-flat", type=int, default=None, help="A flat amount per counted lead, in --lead-currency.")
@click.option("--lead-currency", default=None, help="ISO 4217, lower case (default usd).")
@click.option("--duration", type=click.Choice(DURATIONS), default=None, help="Which of a customer's sales earn.")
@click.option("--duration-months", type=int, default=None, help="With --duration months: within this of the lead.")
@click.option("--hold-days", type=int, default=None, help="Pending this long, then approved (default 30).")
def commission_set(program_id: str, workspace_id: str, **given: Any) -> None:
    """Change a program's commission rules; the ones not given are kept."""
    try:
        rules = CommissionRules.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise click.BadParameter(f"{first['loc'][0]}: {first['msg']}") from None

    _ledger(lambda conn: ledger.set_rules(conn, workspace_id, program_id, rules.model_dump(exclude_none=True)))


@commission.command("list")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--affiliate", "affiliate_id", default=None)
@click.option("--status", type=click.Choice(("pending", "approved", "paid")), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def commission_list(workspace_id: str, affiliate_id: str | None, status: str | None, limit: int) -> None:
    """The ledger's newest rows (a reversal takes back a sale's commission: negative)."""
    filters = {k: v for k, v in (("affiliate_id", affiliate_id), ("status", status)) if v is not None}

    _ledger(lambda conn: ledger.page(conn, "commissions", workspace_id, filters, None, limit))


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
    _ledger(lambda conn: ledger.create_payout(conn, workspace_id, affiliate_id, currency))


@payouts.command("paid")
@out.json_option
@click.argument("payout_id")
@click.option("--workspace", "workspace_id", required=True)
def payouts_paid(payout_id: str, workspace_id: str) -> None:
    """Mark a payout, and its commissions, paid."""
    _ledger(lambda conn: ledger.mark_paid(conn, workspace_id, payout_id))


@payouts.command("list")
@out.json_option
@click.option("--workspace", "workspace_id", required=True)
@click.option("--affiliate", "affiliate_id", default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def payouts_list(workspace_id: str, affiliate_id: str | None, limit: int) -> None:
    """The newest payouts."""
    filters = {"affiliate_id": affiliate_id} if affiliate_id else {}
    _ledger(lambda conn: ledger.page(conn, "payouts", workspace_id, filters, None, limit))
