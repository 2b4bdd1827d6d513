"""A time as ``refstream replay --since/--until`` and the console's Replay page take it,
and the usage error a range that cannot be read is. Here, below both: the command line
(``refstream.commands.replay``) imports the console's modules, never the other way."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

from ingest.contract import clock
from ingest.contract.errors import Refused

_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class RangeUsageError(Refused, click.ClickException):
    """An empty or invalid range: exit 2, like any other usage error."""

    exit_code = 2


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``7d`` (now minus that) or an ISO 8601 datetime (naive means UTC)."""
    if m := _DURATION.match(text.strip()):
        return (now or clock.utcnow()) - timedelta(**{_UNITS[m[2]]: int(m[1])})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RangeUsageError(f"not a duration (2h, 30m, 7d) or an ISO datetime: {text!r}") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
