"""Where webhooks may POST: public addresses only, unless the operator says otherwise.

A webhook URL is chosen by whoever holds a workspace key; without this check the worker
would POST signed payloads to our own network (the metadata service, Redis's HTTP-ish
neighbours, an admin port on loopback). Refused: loopback, private, link-local, multicast,
reserved, unspecified and every other non-global address, IPv4 inside IPv6 included, in
every spelling a resolver accepts (``2130706433``, ``127.1``, ``0x7f.1``,
``[::ffff:127.0.0.1]``), and the ``localhost`` names. Checked when the webhook is created,
and again at each delivery on the addresses the name resolves to then (DNS rebinding):
``PublicResolver`` hands aiohttp only addresses it checked, so the connection goes to one
of them. ``REFSTREAM_WEBHOOK_ALLOW_PRIVATE=true`` lifts the rule, for on-premises receivers.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ingest.contract.urls import hostname

Address = IPv4Address | IPv6Address


def literal(host: str) -> Address | None:
    """The address ``host`` spells, in any form a resolver would read as one; else None."""
    host = host.strip("[]").rstrip(".")
    try:
        return ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if host and all(part.isalnum() for part in host.split(".")):
        try:  # the BSD forms: 127.1, 0x7f.1, 2130706433, 017700000001
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def refusal(addr: Address) -> str | None:
    """Why a delivery may not go to ``addr``; None when it is a public address."""
    if isinstance(addr, IPv6Address) and (inner := addr.ipv4_mapped or addr.sixtofour):
        return refusal(inner)
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return f"{addr}: {kind.replace('_', '-')} address"
    if not addr.is_global:
        return f"{addr}: not a public address"
    return None


def url_refusal(url: str) -> str | None:
    """Why ``url`` may not be a webhook target as written (before any DNS); None if it may."""
    host = (hostname(url) or "").lower()
    if not host:
        return "no host"
    if host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
        return f"{host}: loopback name"
    addr = literal(host)
    return refusal(addr) if addr is not None else None


class PrivateAddress(OSError):
    """A webhook host resolved to an address deliveries may not go to."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)  # aiohttp's connector error shows the strerror


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name when any of its addresses is not public."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            addr = literal(result["host"])
            why = "unparsable address" if addr is None else refusal(addr)
            if why:
                raise PrivateAddress(f"refused: {host} resolves to {why}")
        return results

    async def close(self) -> None:
        await self._inner.close()
