"""User-Agent → browser, OS, device type and brand, and whether a script sent it.

ua-parser's regexes (with the Rust accelerator) name the browser, OS and device; a list of
its own catches the automated clients they do not all call "Spider". Pure: the caller
(``workers.consumer.enrich.Enricher``) builds the resolver once and caches the answers.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver  # the Rust accelerator (ua-parser[regex]); ImportError without it

# Clients that are automated but that the regexes do not all call "Spider": HTTP libraries,
# headless browsers, audits and link-preview fetchers.
_BOT_UA = re.compile(
    r"curl/|wget/|python-requests|python-urllib|aiohttp/|httpx/|go-http-client|okhttp|java/|libwww-perl"
    r"|headlesschrome|phantomjs|puppeteer|playwright|lighthouse|facebookexternalhit|facebookcatalog"
    r"|slackbot|twitterbot|whatsapp|telegrambot|discordbot|linkedinbot|skypeuripreview|applebot"
    r"|pinterestbot|redditbot|embedly|bitlybot",
    re.IGNORECASE,
)
_DESKTOP_OS = frozenset(
    {"Windows", "Mac OS X", "macOS", "Linux", "Ubuntu", "Debian", "Fedora", "Chrome OS", "FreeBSD", "OpenBSD"}
)


class Device(NamedTuple):
    browser: str | None
    browser_version: str | None
    os: str | None
    os_version: str | None
    device_type: str
    device_brand: str | None
    device_model: str | None
    bot_reason: str | None
    doc: dict[str, Any]  # the fields above but bot_reason, as Enrichment.to_json has them (never handed out)

    @property
    def values(self) -> tuple[Any, ...]:
        """``doc``'s values, in its order (the first seven fields)."""
        return self[:7]


def _device(
    browser: str | None,
    browser_version: str | None,
    os: str | None,
    os_version: str | None,
    device_type: str,
    device_brand: str | None,
    device_model: str | None,
    bot_reason: str | None,
) -> Device:
    doc = {
        "browser": browser,
        "browser_version": browser_version,
        "os": os,
        "os_version": os_version,
        "device_type": device_type,
        "device_brand": device_brand,
        "device_model": device_model,
    }
    return Device(browser, browser_version, os, os_version, device_type, device_brand, device_model, bot_reason, doc)


# An empty or missing User-Agent counts as a bot ("ua_missing"): every browser and in-app
# webview sends one, so its absence means a script; over-flagging costs little (the event is
# still stored, with is_bot set) while under-flagging lets scripted clicks into the counts.
NO_UA = _device(None, None, None, None, "other", None, None, "ua_missing")


def parse(resolver: Resolver, ua: str) -> Device:
    """What ``ua`` (stripped, not empty: else ``NO_UA``) says of the client."""
    r = resolver(ua, Domain.ALL)
    agent, os_, device = r.user_agent, r.os, r.device
    if device is not None and device.family == "Spider":
        bot_reason: str | None = "ua_spider"
    elif _BOT_UA.search(ua):
        bot_reason = "ua_list"
    else:
        bot_reason = None
    os_family = os_.family if os_ else None
    brand = device.brand if device else None
    if bot_reason is not None:
        device_type = "bot"
    elif (device and device.family == "iPad") or "Tablet" in ua or (brand and "Tablet" in brand):
        device_type = "tablet"
    elif os_family == "Android" and "Mobile" not in ua:
        device_type = "tablet"  # Android tablets' browsers omit the "Mobile" token; phones send it
    elif (device and device.family in ("iPhone", "iPod")) or "Mobile" in ua or os_family in ("iOS", "Android"):
        device_type = "mobile"
    elif os_family in _DESKTOP_OS:
        device_type = "desktop"
    else:
        device_type = "other"
    return _device(
        agent.family if agent else None,  # browser
        _dotted(agent.major, agent.minor, agent.patch) if agent else None,  # browser_version
        os_family,
        _dotted(os_.major, os_.minor, os_.patch) if os_ else None,  # os_version
        device_type,
        None if not brand or brand.startswith("Generic") or brand == "Spider" else brand,  # device_brand
        device.model if device else None,  # device_model
        bot_reason,
    )


def _dotted(*parts: str | None) -> str | None:
    return ".".join(p for p in parts if p is not None) or None


def resolver() -> Resolver:
    """ua-parser's bundled regexes, for ``parse``: built once per process."""
    return Resolver(load_lazy_builtins())
