"""External ids: the one normalization every door applies to an id a client chose for a
person (a customer's external id, a Bricqs participant or referred session), so that what
one door accepted every other door, the erasure's included, names the same way.

The rule (docs/http-api.md, "External ids"):

1. Unicode NFC: ``"e\\u0301"`` (e and a combining acute) and ``"\\u00e9"`` are one id.
2. Leading and trailing whitespace (Unicode's, so NBSP and the ideographic space too) and
   format characters (category Cf, invisible: zero-width space, joiners, word joiner, BOM,
   bidi marks) are dropped: ``" cust_1\\t"``, ``"cust_1\\u00a0"`` and ``"\\u200bcust_1"`` are ``cust_1``.
3. It is refused when it is longer than the door allows as sent, or when what is left is
   empty or holds a
   control character (tab, newline, NUL, ...), a format character, a line or paragraph
   separator or a lone surrogate anywhere inside: such an id looks like another one it is
   not, and no door could be sure to name it again.

``normalize`` is idempotent: a normalized id normalizes to itself, so ids stored by an
earlier version that were already normal match as they did.
"""

from __future__ import annotations

import re
import unicodedata

from ingest.contract.errors import Refused

MAX_LENGTH = 256

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# the fast path: printable ASCII without a space at either end needs no Unicode table
_PLAIN_ASCII = re.compile(r"^[!-~](?:[ -~]*[!-~])?$")


def _edge(c: str) -> bool:
    """Dropped at either end: whitespace (``str.isspace``: NBSP, tab, ...) and format characters."""
    return c.isspace() or unicodedata.category(c) == "Cf"


class InvalidId(Refused, ValueError):
    """An id no door takes; its message says why, without the id."""


def normalize(value: str, *, max_length: int = MAX_LENGTH) -> str:
    """The id as every door stores and looks it up; ``InvalidId`` for one the rule refuses."""
    if len(value) <= max_length and _PLAIN_ASCII.match(value):
        return value
    if len(value) > max_length:  # as sent, as the request's schema says (NFC may lengthen a few)
        raise InvalidId(f"an id is at most {max_length} characters")
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise InvalidId("an id may not hold a lone surrogate")
    text = unicodedata.normalize("NFC", value)
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    text = text[start:end]
    if not text:
        raise InvalidId("an id may not be empty or only whitespace")
    for c in text:
        if not c.isascii() or not c.isprintable():
            if unicodedata.category(c) in _REFUSED_CATEGORIES:
                raise InvalidId(f"an id may not hold a control or invisible character (U+{ord(c):04X}) inside it")
    return text


def normalized_or_none(value: str, *, max_length: int = MAX_LENGTH) -> str | None:
    """``normalize``, or None for an id the rule refuses (a lookup that finds nothing)."""
    try:
        return normalize(value, max_length=max_length)
    except InvalidId:
        return None


def stored_forms(value: str, *, max_length: int = MAX_LENGTH) -> list[str]:
    """What a lookup or an erasure of ``value`` names: the normalized id, then ``value`` as
    given where it differs and an earlier version could have stored it (rows written before
    this rule keep the id as it was sent). ``InvalidId`` when neither can name anything."""
    forms = []
    normal = normalized_or_none(value, max_length=max_length)
    if normal is not None:
        forms.append(normal)
    storable = 0 < len(value) <= max_length and "\x00" not in value
    if value != normal and storable and not any("\ud800" <= c <= "\udfff" for c in value):
        forms.append(value)
    if not forms:
        normalize(value, max_length=max_length)  # raises, saying why
    return forms


# What careless trackers send when they hold no id for the visitor: a JavaScript value
# printed as text, a default left in a template. Everyone who sends one is a different
# person, so none of them is anyone's id: taken as one, it would make one customer of every
# visitor it reached, and an erasure of any of them would erase them all. (PostHog keeps a
# list like it of ids it never merges people on.) The ONE list, for every client-chosen
# identifier (visitor ids, fingerprints, session ids, click ids, customers', participants'
# and affiliates' external ids, the import's source ids); ``placeholder`` the one test of
# it. What a door does with one (takes it as not sent, or refuses it) is its field's type
# (``ingest.contract.fields``: ``OptionalId``, ``VisitorId``, ``ExternalId``; the table is
# docs/http-api.md's "Placeholder ids").
PLACEHOLDERS = frozenset(
    {
        "undefined",
        "null",
        "none",
        "nil",
        "nan",
        "[object object]",
        "true",
        "false",
        "0",
        "-1",
        "anonymous",
        "unknown",
        "guest",
        "visitor",
        "visitor_id",
        "distinct_id",
        "user_id",
        "id",
    }
)
_LONGEST = max(len(p) for p in PLACEHOLDERS)


def placeholder(value: str) -> bool:
    """Whether a client-chosen identifier is no one's: one of ``PLACEHOLDERS`` in any (ASCII)
    case, once the characters the external id rule drops at the ends are gone (whitespace,
    NBSP, zero-width and other format characters). ``fields.PLACEHOLDER`` is its pattern."""
    text = value.strip()
    if len(text) > _LONGEST and not any(_edge(c) for c in (text[0], text[-1])):
        return False  # the common case: an id longer than any placeholder, nothing to drop
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    text = text[start:end]
    return text.isascii() and text.lower() in PLACEHOLDERS  # ASCII's case only, as the pattern's


def visitor(value: str, *, max_length: int = MAX_LENGTH) -> str | None:
    """A client-chosen visitor id as every door stores it: ``normalize``d, None where it names
    no one (a ``placeholder``, or nothing but whitespace and invisible characters);
    ``InvalidId`` for one with a control or format character inside."""
    if placeholder(value):
        return None
    try:
        text = normalize(value, max_length=max_length)
    except InvalidId:
        if not value.strip() or not any(not _edge(c) for c in value):
            return None  # nothing but the ends' characters: no id at all
        raise
    return None if placeholder(text) else text


def any_case(word: str) -> str:
    """``word`` as an ECMA-262 pattern that matches it in any case."""
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
