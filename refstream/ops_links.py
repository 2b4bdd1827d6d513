"""``refstream link show``: a link with its counters, and per day of the last 30 what
counted, what was dropped and why, and what was flagged (``ingest.manage.stats``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from ingest.contract.settings import Settings
from ingest.manage import admin, stats

from . import ops_output as out
from .runner import open_database, print_data, run_command


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def show_link(code: str) -> None:
    async def go(settings: Settings) -> dict[str, Any]:
        conn = await open_database(settings)
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
    t = out.table(f"{code}: {per_day['from']} to {per_day['to']} (UTC)", "day", "clicks", "leads", "conversions",
                  "dropped", "flagged", left=("day", "dropped", "flagged"))  # fmt: skip
    for d in [*per_day["daily"], {"day": "total", **per_day["totals"]}]:
        t.add_row(out.cell(d["day"]), out.cell(d["clicks"]), out.cell(d["leads"]), out.cell(d["conversions"]),
                  out.cell(_reasons(d["dropped"])), out.cell(_reasons(d["flagged"])))  # fmt: skip
    out.console().print(t)
