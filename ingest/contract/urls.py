"""A URL as every room reads it: a link's domain, a webhook target's check; and a caller's
URL handed back or on (a redirect's destination, a referral URL, a webhook's target) with
its bytes kept: nothing decoded, nothing encoded again but what a header cannot carry."""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

# what a header value cannot carry (controls, non-ASCII) and what no URL holds (a space)
_NOT_IN_HEADER = re.compile(r"[^\x21-\x7e]+")


def hostname(url: str) -> str | None:
    """The URL's host, or None where there is none or the URL does not parse."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def with_param(url: str, name: str, value: str) -> str:
    """``url`` exactly as given with ``name=value`` appended to its query: after ``&`` where
    it has one, after ``?`` where it has none, after nothing where it is empty or ends in
    ``&``; always before the ``#fragment``. Its own bytes are never decoded or re-encoded
    (``urlencode`` turned ``%E9`` into ``%EF%BF%BD``, ``%20`` into ``+`` and ``?flag`` into
    ``?flag=``)."""
    head, hash_, fragment = url.partition("#")
    _, mark, query = head.partition("?")
    if not mark:
        sep = "?"
    elif query == "" or query.endswith("&"):
        sep = ""
    else:
        sep = "&"
    return f"{head}{sep}{name}={value}{hash_}{fragment}"


def without_param(url: str, name: str) -> str:
    """``url`` exactly as given, less every ``name`` or ``name=…`` pair of its query."""
    head, hash_, fragment = url.partition("#")
    path, mark, query = head.partition("?")
    if not mark:
        return url
    kept = "&".join(pair for pair in query.split("&") if pair.partition("=")[0] != name)
    return f"{path}?{kept}{hash_}{fragment}"


def header_safe(url: str) -> str:
    """``url`` as a header (``Location``) can carry it: ASCII, each character a header may
    not hold (a control, a space, anything not ASCII) percent-encoded as its UTF-8 bytes,
    every other one, escapes included, as given. aiohttp refused the rest with a 500."""
    if url.isascii() and url.isprintable() and " " not in url:
        return url  # every URL the API stores: nothing to do
    return _NOT_IN_HEADER.sub(lambda m: quote(m.group().encode("utf-8", "surrogatepass"), safe=""), url)
