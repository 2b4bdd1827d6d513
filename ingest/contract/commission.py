"""A program's commission rules, as stored (``programs.commission``, jsonb) and applied.

What the management API writes and the workers read, so both sides take them apart the
same way. Every amount is an exact integer in a currency's minor unit, never a float:

- ``sale_bps``: a share of each commissioned sale, in basis points (2000 is 20%), rounded
  down to the minor unit; ``sale_flat``: a flat amount per sale, in the sale's currency;
- ``lead_flat`` in ``lead_currency``: a flat amount per counted lead;
- ``duration``: which of a customer's sales earn: ``lifetime`` (all), ``months`` (those
  received within ``duration_months`` of the customer's lead), ``first_sale`` (the
  customer's first attributed sale in the program, by received time);
- ``hold_days``: a commission is ``pending`` until this long after its sale or lead was
  received, then ``approved``; ``paid`` once a payout includes it.

Empty rules (a program that never set any) earn nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

DURATIONS = ("lifetime", "months", "first_sale")
BPS = 10_000


@dataclass(frozen=True, slots=True)
class Rules:
    sale_bps: int = 0
    sale_flat: int = 0
    lead_flat: int = 0
    lead_currency: str = "usd"
    duration: str = "lifetime"
    duration_months: int = 12
    hold_days: int = 30

    @classmethod
    def from_json(cls, raw: Any) -> Rules:
        """The stored rules (a dict, or its JSON text where a connection has no jsonb codec);
        anything missing takes its default (earning nothing)."""
        if isinstance(raw, str | bytes):
            raw = orjson.loads(raw)
        if not isinstance(raw, dict):
            return cls()
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def for_sale(self, amount: int) -> int:
        """The commission of one sale of ``amount`` (before the duration says whether it earns)."""
        return amount * self.sale_bps // BPS + self.sale_flat

    def within(self, sold_at: datetime, lead_at: datetime) -> bool:
        """``months``: whether a sale at ``sold_at`` is within the duration of its lead at
        ``lead_at`` (a month is 30 days, so the bound is a fixed span)."""
        return self.duration != "months" or sold_at - lead_at <= timedelta(days=30 * self.duration_months)

    def approve_after(self, at: datetime) -> datetime:
        return at + timedelta(days=self.hold_days)
