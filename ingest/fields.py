"""String types for the request models: what reaches Postgres or a URL parser is checked
here, at the model boundary, so a bad value is the route's 400 and never a 500 later.

- ``Text``: no NUL (Postgres text refuses it) and no other control character but tab and
  newline.
- ``Ident``: an identifier (external id, code, name of a thing): no control character at
  all, no surrogate.
- ``Url``: an absolute http(s) URL that ``urllib.parse.urlsplit`` parses, with a host, a
  valid port and no whitespace or control character.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))
_TEXT_CONTROL = _CONTROL - {"\t", "\n", "\r"}


def _surrogate(value: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in value)


def check_text(value: str) -> str:
    if any(c in _TEXT_CONTROL for c in value) or _surrogate(value):
        raise ValueError("control characters (NUL included) are not allowed")
    return value


def check_ident(value: str) -> str:
    if any(c in _CONTROL for c in value) or _surrogate(value):
        raise ValueError("control characters (NUL included) are not allowed")
    return value


def hostname(url: str) -> str | None:
    """The URL's host, or None where there is none or the URL does not parse."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def check_url(value: str) -> str:
    if any(c in _CONTROL or c.isspace() for c in value) or _surrogate(value):
        raise ValueError("whitespace and control characters are not allowed in a URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a port out of range or not a number)
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an absolute http(s) URL with a host")
    return value


Text = Annotated[str, AfterValidator(check_text)]
Ident = Annotated[str, AfterValidator(check_ident)]
Url = Annotated[str, AfterValidator(check_url)]
