"""Currencies' minor units: ISO 4217's exponents, and a major-unit amount in minor units.

Every amount refstream stores is an exact integer in its currency's minor unit: 500 is
$5.00 (USD, exponent 2), ¥500 (JPY, exponent 0) and 0.500 KWD (exponent 3). A rule that
gives an amount in major units ("5.00") is turned into minor units here, once, by the
currency's exponent, and refused when it has more decimals than the currency has.

The exponents are ISO 4217's (the list's "minor unit" column, as amended to 2024); a
currency not in the exceptions below has 2. Codes are lower case, as sales store them.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# ISO 4217 currencies whose minor unit is not 2 decimals (active codes and funds)
_ZERO = (
    "bif",
    "clp",
    "djf",
    "gnf",
    "isk",
    "jpy",
    "kmf",
    "krw",
    "pyg",
    "rwf",
    "ugx",
    "uyi",
    "vnd",
    "vuv",
    "xaf",
    "xof",
    "xpf",
)
_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(_ZERO, 0),
    **dict.fromkeys(("bhd", "iqd", "jod", "kwd", "lyd", "omr", "tnd"), 3),
    **dict.fromkeys(("clf", "uyw"), 4),
}
_CODE = re.compile(r"^[a-z]{3}$")
_MAJOR = re.compile(r"^[0-9]{1,15}(\.[0-9]{1,4})?$")


def exponent(currency: str) -> int:
    """Decimals of the currency's minor unit: 2 for USD, 0 for JPY, 3 for KWD."""
    return _EXPONENTS.get(currency.lower(), 2)


def valid_code(currency: str) -> bool:
    return bool(_CODE.match(currency))


def to_minor(major: str, currency: str) -> int:
    """``"5.00"`` USD is 500, ``"500"`` JPY is 500, ``"0.5"`` KWD is 500; ``ValueError`` for a
    text that is not a plain non-negative decimal or has more decimals than the currency."""
    if not _MAJOR.match(major):
        raise ValueError(f"{major[:40]!r} is not an amount like 5.00")
    places = exponent(currency)
    try:
        value = Decimal(major).scaleb(places)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{major[:40]!r} is not an amount") from None
    if value != value.to_integral_value():
        raise ValueError(f"{currency.upper()} has {places} decimals: {major[:40]!r} has more")
    return int(value)


def to_major(minor: int, currency: str) -> str:
    """The minor units as the currency writes them: 500 USD is ``"5.00"``, JPY ``"500"``."""
    places = exponent(currency)
    return str(Decimal(minor).scaleb(-places).quantize(Decimal(1).scaleb(-places)))
