"""A program's commission rules, as stored (``programs.commission``, jsonb) and applied.

What the management API writes and the workers read, so both sides take them apart the
same way. Every amount is an exact integer in a currency's minor unit, never a float:

- ``sale_bps``: a share of each commissioned sale, in basis points (2000 is 20%), rounded
  down to the minor unit;
- ``sale_flat``: a flat amount per sale, **per currency**: a mapping of ISO 4217 code to
  minor units of that currency (``{"usd": 500, "jpy": 500, "kwd": 500}`` is $5.00, ¥500
  and 0.500 KWD; ``ingest.contract.currency`` turns major units into these). A sale in a
  currency the mapping lacks earns no flat part (its share still). Rules stored before
  (one number for every currency) read as that number in the program's currency, which is
  ``lead_currency`` (the only currency a program names; default usd), and ``refstream
  migrate`` rewrites them so;
- ``lead_flat`` in ``lead_currency``: a flat amount for a customer's lead, earned **once
  per customer and program** (by the customer's first counted lead in the program, by
  received time) unless ``lead_events`` names events: then each named event earns it once
  per customer, and leads of other names earn nothing;
- ``duration``: which of a customer's sales earn: ``lifetime`` (all, for ever),
  ``months`` (those received within ``duration_months`` of the customer's FIRST counted
  lead in the program), ``first_sale`` (the customer's first attributed sale in the
  program, by received time). A sale is attributed to its customer's lead however long
  after it (``workers.consumer.sales``): the duration decides whether it earns;
- ``hold_days``: a commission is ``pending`` until this long after its sale or lead was
  received, then ``approved``; ``paid`` once a payout includes it.

A sale of amount 0 (a 100 % coupon, a free trial's "purchase") is stored like any other
and earns nothing by any rule, flat parts included; under ``first_sale`` it is not the
customer's first purchase (the first sale of more than nothing is).

Empty rules (a program that never set any) earn nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from ingest.contract.currency import valid_code

DURATIONS = ("lifetime", "months", "first_sale")
BPS = 10_000


@dataclass(frozen=True, slots=True)
class Rules:
    sale_bps: int = 0
    sale_flat: Mapping[str, int] = field(default_factory=dict)  # currency -> minor units
    lead_flat: int = 0
    lead_currency: str = "usd"
    lead_events: tuple[str, ...] = ()  # each earns lead_flat once per customer; none: once per customer
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
        flats = raw["sale_flats"] if "sale_flats" in raw else raw.get("sale_flat")
        known["sale_flat"] = flat_by_currency(flats, str(raw.get("lead_currency") or "usd"))
        events = raw.get("lead_events")
        names = events if isinstance(events, list) else []
        known["lead_events"] = tuple(sorted({e for e in names if isinstance(e, str)}))
        return cls(**known)

    def as_json(self) -> dict[str, Any]:
        """The rules as the API shows them (``sale_flat``: the mapping, as it is given)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["sale_flat"] = dict(sorted(self.sale_flat.items()))
        out["lead_events"] = list(self.lead_events)
        return out

    def for_sale(self, amount: int, currency: str) -> int:
        """The commission of one sale of ``amount`` minor units of ``currency`` (before the
        duration says whether it earns): the share, and the flat amount of that currency
        (none where the rules have no flat amount in it: never another currency's number).
        A sale of nothing earns nothing: no rule pays on it."""
        if amount <= 0:
            return 0
        return amount * self.sale_bps // BPS + self.sale_flat.get(currency.lower(), 0)

    def lead_group(self, name: str | None) -> str | None:
        """Which of a customer's leads share one ``lead_flat``: all of them (``""``), or, where
        ``lead_events`` names events, those of one named event; None: the lead earns nothing."""
        if not self.lead_events:
            return ""
        return name if name in self.lead_events else None

    def within(self, sold_at: datetime, first_lead_at: datetime | None) -> bool:
        """``months``: whether a sale at ``sold_at`` is within the duration of the customer's
        first lead in the program at ``first_lead_at`` (a month is 30 days, so the bound is a
        fixed span); every other duration: always."""
        if self.duration != "months":
            return True
        return first_lead_at is not None and sold_at - first_lead_at <= timedelta(days=30 * self.duration_months)

    def approve_after(self, at: datetime) -> datetime:
        return at + timedelta(days=self.hold_days)


def flat_by_currency(raw: Any, program_currency: str) -> dict[str, int]:
    """``sale_flat`` as stored: a mapping of currency to minor units; an older single number
    meant in the program's currency (``lead_currency``), and 0 or nothing: none."""
    if isinstance(raw, bool):
        return {}
    if isinstance(raw, int):
        return {program_currency.lower(): raw} if raw > 0 else {}
    if isinstance(raw, dict):
        return {
            k.lower(): v
            for k, v in raw.items()
            if isinstance(k, str) and valid_code(k.lower()) and isinstance(v, int) and not isinstance(v, bool) and v > 0
        }
    return {}
