"""String types for the request models: what reaches Postgres or a URL parser is checked
here, at the model boundary, so a bad value is the route's 400 and never a 500 later.

- ``Text``: no NUL (Postgres text refuses it) and no other control character but tab and
  newline.
- ``Ident``: an identifier (external id, code, name of a thing): no control character at
  all, no surrogate.
- ``ExternalId``: an id a client chose for a person (a customer's external id, a Bricqs
  participant or session), normalized by ``ingest.contract.ids`` (NFC, whitespace and
  invisible characters at the ends dropped; empty or control/format characters inside
  refused), so every door, the erasure's included, names the person the same way; a
  placeholder such as ``undefined`` (``ingest.contract.ids.PLACEHOLDERS``) is refused.
- ``VisitorId``: a visitor id a client chose, normalized as an ``ExternalId``, None where
  it is a placeholder or only whitespace; ``SessionId``: an ``ExternalId`` that keys an
  event; ``OptionalId``: any other id a client chose that the door can do without (a
  fingerprint, a page session, an earlier click id), None where it is a placeholder.
- ``Integer``: a JSON integer (``30`` or ``30.0``), never a string such as ``"30"``.
- A sale's: ``Currency`` (ISO 4217's three letters, kept lower case), ``Processor``,
  ``Metadata`` (a JSON object with no NUL inside) and ``MAX_AMOUNT``.
- ``Url``: an absolute http(s) URL that ``urllib.parse.urlsplit`` parses, with a host, a
  valid port and no whitespace or control character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ingest.contract import ids

# what each check refuses, one character class each (a regex scans in C: a per-character
# loop in Python was a quarter of the batch route's CPU); surrogates (lone halves of a
# UTF-16 pair, which no UTF-8 encoder takes) are refused by every check
_SURROGATES = "\ud800-\udfff"
_NUL_BAD = re.compile(f"[\x00{_SURROGATES}]")
_TEXT_BAD = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f{_SURROGATES}]")
_IDENT_BAD = re.compile(f"[\x00-\x1f\x7f{_SURROGATES}]")

# what /openapi.json says of each type: the same rule as the validator, so a client (or a
# fuzzer) that keeps to the document is never refused, and one that does not always is
NO_NUL = r"^[^\x00]*$"
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
IDENT = r"^[^\x00-\x1f\x7f]*$"
# an external id (ingest.contract.ids): whitespace and format characters at the ends, at
# least one other character, and no control, format or line-separator character inside.
# The classes are Unicode's (14.0, Python 3.11's unicodedata; tests/test_external_ids.py
# holds them to it): format characters (Cf), and whitespace as str.isspace says
FORMAT_RANGES = (
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
SPACE_RANGES = (
    (0x9, 0xD),
    (0x1C, 0x20),
    (0x85, 0x85),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)


def _class(ranges: tuple[tuple[int, int], ...]) -> str:
    # BMP characters escaped; astral ones as themselves (a JSON Schema pattern is ECMA's)
    def one(cp: int) -> str:
        return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)

    return "".join(one(a) if a == b else f"{one(a)}-{one(b)}" for a, b in ranges)


_ID_EDGE = f"[{_class(SPACE_RANGES)}{_class(FORMAT_RANGES)}]"
_ID_BAD = f"\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029{_class(FORMAT_RANGES)}"
_ID_END = f"[^{_class(SPACE_RANGES)}{_ID_BAD}]"
EXTERNAL_ID = f"^{_ID_EDGE}*{_ID_END}(?:[^{_ID_BAD}]*{_ID_END})?{_ID_EDGE}*$"
# ``ids.placeholder`` as a pattern: a placeholder in any case, the rule's edge characters
# at either end (what a client that keeps to the document never sends where one is refused)
PLACEHOLDER = f"^{_ID_EDGE}*(?:{'|'.join(ids.any_case(p) for p in sorted(ids.PLACEHOLDERS))}){_ID_EDGE}*$"
# a visitor id: an external id, or nothing but the ends' characters (taken as none sent)
VISITOR_ID = f"^{_ID_EDGE}*$|{EXTERNAL_ID}"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
# an absolute http(s) URL with a host name or IPv4 address (IPv6 literals are not taken),
# optional user info and port, and no whitespace or control character anywhere
URL = (
    r"^https?://(?:[A-Za-z0-9._~%!$&'()*+,;=:-]*@)?[A-Za-z0-9._~%-]+(?::" + _PORT + r")?"
    r"(?:[/?#][^\x00-\x20\x7f]*)?$"
)
_URL_RE = re.compile(URL)


@dataclass(frozen=True)
class _Documented:
    """Adds ``pattern`` to a type's JSON schema (the validator enforces it, with a clearer message)."""

    pattern: str

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema: dict[str, Any] = handler(core)
        schema["pattern"] = self.pattern
        return schema


@dataclass(frozen=True)
class _NoPlaceholder:
    """Adds ``not: {pattern: PLACEHOLDER}`` to a type's JSON schema: the placeholders, in any
    case and with whitespace or invisible characters at the ends, as the validator refuses them."""

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema: dict[str, Any] = handler(core)
        schema["not"] = {"pattern": PLACEHOLDER}
        return schema


def check_no_nul(value: str) -> str:
    if _NUL_BAD.search(value):
        raise ValueError("NUL characters (\\u0000) are not allowed")
    return value


def check_text(value: str) -> str:
    if _TEXT_BAD.search(value):
        raise ValueError("control characters (NUL included) are not allowed")
    return value


def check_ident(value: str) -> str:
    if _IDENT_BAD.search(value):
        raise ValueError("control characters (NUL included) are not allowed")
    return value


def external_id(value: str) -> str:
    try:
        return ids.normalize(value)
    except ids.InvalidId as exc:
        raise ValueError(str(exc)) from None


def visitor_id(value: str | None) -> str | None:
    """A client-chosen visitor id as every door stores it (``ids.visitor``: the external id
    rule), or None where it names no one: a placeholder (``ids.PLACEHOLDERS``: ``undefined``,
    ``null``, ...) or nothing but whitespace. The door then does what it does for a visitor
    it was not told, mints one or matches a fingerprint."""
    try:
        return None if value is None else ids.visitor(value)
    except ids.InvalidId as exc:
        raise ValueError(str(exc)) from None


def someones(value: str) -> str:
    """A client-chosen id that names someone or keys something (a customer's, participant's
    or affiliate's external id, a referred session, an import's row): a placeholder
    (``ids.PLACEHOLDERS``) is refused, as it would make one subject of everyone who sent it."""
    if ids.placeholder(value):
        raise ValueError("a placeholder (such as 'undefined' or 'null') is no one's id")
    return value


def no_ones(value: str | None) -> str | None:
    """A client-chosen id a door can do without (a fingerprint, a page session, an earlier
    click's id, a tracker's dedupe key, the import's click reference): a placeholder is
    taken as not sent."""
    return None if value is None or ids.placeholder(value) else value


T = TypeVar("T", str, str | None)


def not_placeholder(value: T) -> T:
    """An order's or a refund's own id that names which one (a refund's sale, a refund's
    key): a placeholder names none, refused (taken, it would make one of everyone's)."""
    if isinstance(value, str) and ids.placeholder(value):
        raise ValueError("a placeholder (such as 'undefined' or 'null') names no order or refund")
    return value


def no_nul_inside(value: Any) -> Any:
    """For free-form JSON (metadata): no NUL in any key or string, at any depth."""
    if isinstance(value, str):
        check_no_nul(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            no_nul_inside(k)
            no_nul_inside(v)
    elif isinstance(value, list):
        for v in value:
            no_nul_inside(v)
    return value


def check_url(value: str) -> str:
    if not _URL_RE.match(value):
        raise ValueError("an absolute http(s) URL with a host, without whitespace or control characters")
    try:  # the pattern keeps to what urlsplit takes; checked anyway, it is what reads it later
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a port out of range or not a number)
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if not parts.hostname:
        raise ValueError("an absolute http(s) URL with a host")
    return value


def json_integer(value: Any) -> Any:
    """JSON's integers: ``30`` and ``30.0`` (the same number in JSON), never ``"30"`` or ``true``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer (a JSON number, not a string)")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be a whole number")
    return int(value)


Integer = Annotated[int, BeforeValidator(json_integer)]
NoNul = Annotated[str, AfterValidator(check_no_nul), _Documented(NO_NUL)]
Text = Annotated[str, AfterValidator(check_text), _Documented(TEXT)]
Ident = Annotated[str, AfterValidator(check_ident), _Documented(IDENT)]
# a person's id a client chose: normalized, a placeholder refused (``someones``)
ExternalId = Annotated[
    str, AfterValidator(external_id), AfterValidator(someones), _Documented(EXTERNAL_ID), _NoPlaceholder()
]
# a visitor id a client chose: normalized as an external id, a placeholder taken as none (``visitor_id``)
VisitorId = Annotated[NoNul | None, AfterValidator(visitor_id), _Documented(VISITOR_ID)]
# a visitor's session that keys an event (Bricqs' referred_session_id): an external id
SessionId = ExternalId
# an id a client chose that the door can do without: a placeholder taken as not sent (``no_ones``)
OptionalId = Annotated[NoNul | None, AfterValidator(no_ones)]
# an order's id a sale may go without (its invoice): a placeholder taken as not sent, so
# that careless clients' sales are not one invoice (``no_ones``)
OrderId = Annotated[Ident | None, AfterValidator(no_ones)]
# an order's or a refund's id that says which (a refund's sale, its key): a placeholder refused
RecordId = Annotated[Ident, AfterValidator(not_placeholder), _NoPlaceholder()]
OptionalRecordId = Annotated[Ident | None, AfterValidator(not_placeholder)]
Url = Annotated[str, AfterValidator(check_url), _Documented(URL)]


# a sale's fields, shared by every route that takes one and by the import
PROCESSORS = ("stripe", "shopify", "paddle", "polar", "apple", "revenuecat", "lemonsqueezy", "dub", "custom")
# minor units: far above any one sale (10 billion dollars), and 9 million of them on one
# link, day and currency still fit sale_stats' bigint sums
MAX_AMOUNT = 10**12
# Dub's SDKs send any of these (their ``PaymentProcessor``)
Processor = Literal["stripe", "shopify", "paddle", "polar", "apple", "revenuecat", "lemonsqueezy", "dub", "custom"]


# ISO 4217's three letters, in either case; stored lower case, as Stripe writes them
Currency = Annotated[
    str, Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, e.g. usd (kept lower case)"), AfterValidator(str.lower)
]
AMOUNT = "In the currency's minor unit (4900 is 49.00 USD): a JSON integer, never a string or a fraction"
Metadata = Annotated[dict[str, Any], AfterValidator(no_nul_inside)]
