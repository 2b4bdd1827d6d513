"""A URL's host as every room reads it: a link's domain, a webhook target's check."""

from __future__ import annotations

from urllib.parse import urlsplit


def hostname(url: str) -> str | None:
    """The URL's host, or None where there is none or the URL does not parse."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None
