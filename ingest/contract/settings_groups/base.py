"""What every settings group shares: the configuration (every variable ``REFSTREAM_<FIELD>``),
the aliases of a renamed variable, and durations as settings and commands take them."""

from __future__ import annotations

import re

from pydantic import AliasChoices
from pydantic_settings import SettingsConfigDict

CONFIG = SettingsConfigDict(env_prefix="REFSTREAM_", extra="ignore", frozen=True)

_DURATION_RE = re.compile(r"^(\d+)\s*([smhd])?$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> int:
    """A duration as settings and commands take it: 3600, 90s, 30m, 1h, 2d."""
    if not (m := _DURATION_RE.match(text.strip().lower())):
        raise ValueError("seconds, or a number with s, m, h or d: 3600, 90s, 30m, 1h, 2d")
    return int(m[1]) * _DURATION_UNITS[m[2] or "s"]


def renamed(field: str, *former: str) -> AliasChoices:
    """The environment names of a setting whose name changed (issue 38 put the unit in
    every name): ``REFSTREAM_<FIELD>`` first, so it wins where both are given; then the
    former names, still read; then the field's own name, for ``Settings(field=...)``.
    docs/configuration.md lists each former name beside its new one."""
    return AliasChoices(f"REFSTREAM_{field.upper()}", *former, field)
