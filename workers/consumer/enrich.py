"""Enrichment: IP → country, AS and (optionally) city; User-Agent → browser, OS, device, bot.

Pure and synchronous. An `Enricher` is built once per worker process at startup; it loads
the bundled geo data and the UA regexes in its constructor, never at import time, and
nothing is downloaded: geoip2fast's country+ASN file and ua-parser's regexes ship inside
their wheels (the README names the data and its licences). The geo tables are held compactly (``workers.consumer.geo``).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import maxminddb

from ingest.contract.errors import Misconfigured
from workers.consumer import device, geo

# Well-known cloud/datacenter networks: AS number → organisation name(s) as spelled in the
# bundled GeoLite2 data (checked against each provider's address ranges).
_DATACENTERS: dict[int, tuple[str, ...]] = {
    16509: ("AMAZON-02",),  # AWS
    14618: ("AMAZON-AES",),  # AWS us-east-1
    15169: ("GOOGLE",),
    396982: ("GOOGLE-CLOUD-PLATFORM",),
    8075: ("MICROSOFT-CORP-MSN-AS-BLOCK",),  # Azure
    14061: ("DIGITALOCEAN-ASN",),
    16276: ("OVH SAS",),
    24940: ("Hetzner Online GmbH",),
    63949: ("Akamai Connected Cloud",),  # Linode
    31898: ("ORACLE-BMC-31898",),
    45102: ("Alibaba US Technology Co., Ltd.",),
    132203: ("Tencent Building, Kejizhongyi Avenue",),
    12876: ("Scaleway S.a.s.",),
    20473: ("AS-CHOOPA",),  # Vultr
}
_DATACENTER_NAMES = frozenset(name for names in _DATACENTERS.values() for name in names)

_IP_POLICIES = ("full", "truncated", "none")
_T = TypeVar("_T")


class EnrichConfigError(Misconfigured, ValueError):
    """The enricher's configuration is wrong (e.g. `city_db` points at nothing): fix and restart.

    Deliberately not an OSError: workers.group.errors treats OSError as transient and would retry.
    """


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What one event's IP, User-Agent and referrer tell; `None` where they tell nothing.

    `device_type` is "bot" whenever the User-Agent itself gives the bot away ("ua_spider",
    "ua_list"); a datacenter IP sets `is_bot` but leaves the device as the UA describes it.
    """

    ip: str | None
    country: str | None
    asn: int | None
    as_name: str | None
    city: str | None
    region: str | None
    latitude: float | None
    longitude: float | None
    browser: str | None
    browser_version: str | None
    os: str | None
    os_version: str | None
    device_type: str
    device_brand: str | None
    device_model: str | None
    is_bot: bool
    bot_reason: str | None
    referrer_domain: str | None
    versions: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        """A plain dict for a jsonb column."""
        out = {name: getattr(self, name) for name in _ENRICHMENT_FIELDS}
        out["versions"] = dict(self.versions)
        return out


_ENRICHMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Enrichment))
# what a User-Agent alone tells (device.Device.doc's keys, in its order)
DEVICE_FIELDS = tuple(device.NO_UA.doc)
# what the geo data tells of an address beside its country and AS number: the same for every
# address of a network, whatever the workspace's IP policy stores of the address itself
PLACE_FIELDS = ("as_name", "city", "region", "latitude", "longitude")


class Found:
    """What the store writes of an enrichment (``Enricher.enrich_row``): the few values a
    row takes, and the whole document (``doc``) made only when it is asked for (a row
    stores three of its fields: ``event_row.row_fields``)."""

    __slots__ = (
        "_ua",
        "_versions",
        "_where",
        "asn",
        "bot_reason",
        "country",
        "device",
        "ip",
        "place",
        "referrer_domain",
    )

    def __init__(
        self,
        where: _Where,
        ua: device.Device,
        bot_reason: str | None,
        referrer_domain: str | None,
        versions: Mapping[str, str],
    ) -> None:
        self.ip: str | None = where.ip
        self.country: str | None = where.country
        self.asn: int | None = where.place.asn
        self.bot_reason = bot_reason
        self.referrer_domain = referrer_domain
        # what the User-Agent said: the values of DEVICE_FIELDS (``Enricher.device_doc``)
        self.device: tuple[Any, ...] = ua.values
        # what the address said of its network: the values of PLACE_FIELDS (``Enricher.place_doc``)
        self.place: tuple[Any, ...] = where.spot
        self._where, self._ua, self._versions = where, ua, versions

    @property
    def is_bot(self) -> bool:
        return self.bot_reason is not None

    @property
    def doc(self) -> dict[str, Any]:
        """== Enrichment.to_json() of the same input."""
        return {
            **self._where.doc,
            **self._ua.doc,
            "is_bot": self.bot_reason is not None,
            "bot_reason": self.bot_reason,
            "referrer_domain": self.referrer_domain,
            "versions": dict(self._versions),
        }


class Enricher:
    """Built once per process at worker startup; `enrich()` is then cheap and does no I/O.

    Two bounded LRU caches make it cheap, each keyed by all its answer depends on, so a hit
    is what a parse would give (tests/test_enrich.py): User-Agent parses, and what an
    address says under an IP policy. The address cache holds visitors' addresses, which is
    acceptable because it is this process's memory only (never logged, persisted nor sent
    anywhere) and holds at most ``ip_cache_size`` of them, the least recently seen evicted
    first: an erased person's address leaves it as new traffic comes in, or with the
    process. It cannot be keyed by a network prefix instead: the geo data holds networks
    as small as one address (/32), and the "full" policy stores the address itself.
    """

    def __init__(self, city_db: str | None = None, ua_cache_size: int = 10_000, ip_cache_size: int = 50_000) -> None:
        self._geo = _load_geoip()
        self._city: maxminddb.Reader | None = None
        versions = {
            "geoip2fast": version("geoip2fast"),
            "geoip2fast_data": str(self._geo.source_info),
            "ua-parser": version("ua-parser"),
            "ua-parser-rs": version("ua-parser-rs"),
            "ua-parser-builtins": version("ua-parser-builtins"),  # the regexes.yaml snapshot
        }
        if city_db is not None:
            if not os.path.isfile(city_db):
                raise EnrichConfigError(
                    f"city_db={city_db!r}: no such file; give a MaxMind City .mmdb or leave it unset"
                )
            try:
                self._city = maxminddb.open_database(city_db)
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
                raise EnrichConfigError(f"city_db={city_db!r} is not a readable .mmdb: {exc}") from exc
            meta = self._city.metadata()
            versions["city_db"] = f"{meta.database_type}@{meta.build_epoch}"
        self.versions: Mapping[str, str] = MappingProxyType(versions)
        self._ua = functools.lru_cache(maxsize=ua_cache_size)(functools.partial(device.parse, device.resolver()))
        self._where = functools.lru_cache(maxsize=ip_cache_size)(self._locate)

    def ua_cache_info(self) -> functools._CacheInfo:
        """Hits and misses of the per-process User-Agent cache (for metrics and tests)."""
        return self._ua.cache_info()

    def ip_cache_info(self) -> functools._CacheInfo:
        """Hits and misses of the per-process (address, IP policy) cache."""
        return self._where.cache_info()

    def close(self) -> None:
        """Close the City .mmdb reader, if any (worker shutdown)."""
        if self._city is not None:
            self._city.close()

    def enrich(
        self, ip: str | None, user_agent: str | None, referrer: str | None, ip_policy: str = "full"
    ) -> Enrichment:
        """Enrich one event. Never raises on bad input (malformed IP, odd UA, junk referrer);
        raises ValueError only for an unknown `ip_policy`, which is a caller bug."""
        where, ua, bot_reason = self._parts(ip, user_agent, ip_policy)
        ip_out, country, as_name, place, _, _ = where
        return Enrichment(
            ip=ip_out,
            country=country,
            asn=place.asn,
            as_name=as_name,
            city=place.city,
            region=place.region,
            latitude=place.latitude,
            longitude=place.longitude,
            browser=ua.browser,
            browser_version=ua.browser_version,
            os=ua.os,
            os_version=ua.os_version,
            device_type=ua.device_type,
            device_brand=ua.device_brand,
            device_model=ua.device_model,
            is_bot=bot_reason is not None,
            bot_reason=bot_reason,
            referrer_domain=_referrer_domain(referrer) if referrer else None,
            versions=self.versions,
        )

    def enrich_row(
        self, ip: str | None, user_agent: str | None, referrer: str | None, ip_policy: str = "full"
    ) -> Found:
        """``enrich``, as the store writes it: the same values, ``doc`` equal to its
        ``to_json()``, assembled from the per-address and per-User-Agent parts the caches
        hold rather than field by field (an ``Enrichment`` and its dict cost the worker
        ~8% of its CPU), and the document only if asked for."""
        where, ua, bot_reason = self._parts(ip, user_agent, ip_policy)
        return Found(where, ua, bot_reason, _referrer_domain(referrer) if referrer else None, self.versions)

    def device_of(self, user_agent: str | None) -> tuple[Any, ...]:
        """``Found.device`` of any enrichment of ``user_agent`` (from the User-Agent cache)."""
        ua = self._ua(stripped) if user_agent and (stripped := user_agent.strip()) else device.NO_UA
        return ua.values

    def device_doc(self, device: tuple[Any, ...]) -> dict[str, Any]:
        """A ``Found.device`` as ``event_devices`` holds it: its fields as ``doc`` has them,
        and the versions of the data and parsers (schema.sql, version 16)."""
        return {**dict(zip(DEVICE_FIELDS, device, strict=True)), "versions": dict(self.versions)}

    def place_of(self, ip: str | None) -> tuple[Any, ...]:
        """``Found.place`` of any enrichment of ``ip`` (from the address cache): the same
        under every IP policy, which changes only the address stored."""
        return self._where(ip, "full").spot if ip else _NOWHERE.spot

    @staticmethod
    def place_doc(place: tuple[Any, ...]) -> dict[str, Any] | None:
        """A ``Found.place`` as ``event_places`` holds it: its fields that are not null (a
        null one reads as null), None when all are (no entry: the row names none)."""
        return {k: v for k, v in zip(PLACE_FIELDS, place, strict=True) if v is not None} or None

    def stored_ip(self, ip: str | None, ip_policy: str = "full") -> str | None:
        """The address as stored under ``ip_policy`` (``enrich(ip, ...).ip``), from the
        address cache: for an event that gets no enrichment (a server-to-server call's
        address is its server's), without assembling one."""
        _check_policy(ip_policy)
        return self._where(ip, ip_policy).ip if ip else None

    def _parts(
        self, ip: str | None, user_agent: str | None, ip_policy: str
    ) -> tuple[_Where, device.Device, str | None]:
        _check_policy(ip_policy)
        where = self._where(ip, ip_policy) if ip else _NOWHERE
        ua = self._ua(stripped) if user_agent and (stripped := user_agent.strip()) else device.NO_UA
        bot_reason = ua.bot_reason
        if bot_reason is None and (where.place.asn in _DATACENTERS or where.as_name in _DATACENTER_NAMES):
            bot_reason = "datacenter_asn"
        return where, ua, bot_reason

    def _locate(self, ip: str, ip_policy: str) -> _Where:
        """What an address says: cached per (address, policy), since visitors come back."""
        addr = _parse_ip(ip)
        country: str | None = None
        as_name: str | None = None
        place = _NO_CITY
        # Private, loopback, link-local, reserved, CGNAT: no geo. geoip2fast misreads small
        # IPv6 integers (::1) as IPv4, so it only sees what ipaddress calls global; its own
        # "--"/IANA answers (multicast, 6to4 relay, unallocated space) are dropped as well.
        if addr is not None and addr.is_global:
            country, as_name = self._geo.lookup(int(addr))
            if self._city is not None:
                # the .mmdb wins where it knows the address: it is usually the newer snapshot,
                # and its country must agree with its city
                place = self._lookup_city(addr)
                country = place.country or country
        return _where(_apply_policy(addr, ip_policy), country, as_name, place)

    def _lookup_city(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> _City:
        assert self._city is not None
        try:
            rec = self._city.get(addr)
        except ValueError:  # an IPv6 address against an IPv4-only database
            return _NO_CITY
        return _City(
            city=_of(str, _dig(rec, "city", "names", "en")),
            region=_of(str, _dig(rec, "subdivisions", 0, "names", "en")),
            latitude=_of(float, _dig(rec, "location", "latitude")),
            longitude=_of(float, _dig(rec, "location", "longitude")),
            asn=_of(int, _dig(rec, "traits", "autonomous_system_number")),  # GeoIP2 Enterprise only
            country=_of(str, _dig(rec, "country", "iso_code")),
        )


class _City(NamedTuple):
    city: str | None
    region: str | None
    latitude: float | None
    longitude: float | None
    asn: int | None
    country: str | None


_NO_CITY = _City(None, None, None, None, None, None)


class _Where(NamedTuple):
    ip: str | None  # as stored, after the workspace's IP policy
    country: str | None
    as_name: str | None
    place: _City
    doc: dict[str, Any]  # these as Enrichment.to_json has them (never handed out)
    spot: tuple[Any, ...]  # doc's PLACE_FIELDS values: ``Found.place``


def _where(ip: str | None, country: str | None, as_name: str | None, place: _City) -> _Where:
    doc = {
        "ip": ip,
        "country": country,
        "asn": place.asn,
        "as_name": as_name,
        "city": place.city,
        "region": place.region,
        "latitude": place.latitude,
        "longitude": place.longitude,
    }
    return _Where(ip, country, as_name, place, doc, tuple(doc[k] for k in PLACE_FIELDS))


_NOWHERE = _where(None, None, None, _NO_CITY)


def _dig(node: object, *path: str | int) -> object:
    for key in path:
        if isinstance(key, int):
            node = node[key] if isinstance(node, list) and len(node) > key else None
        else:
            node = node.get(key) if isinstance(node, dict) else None
    return node


def _of(kind: type[_T], value: object) -> _T | None:
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


@functools.cache
def _load_geoip() -> geo.GeoTable:
    """One copy of the geo tables per process (~35 MB; geoip2fast's own lists took ~110)."""
    return geo.load()


def _check_policy(ip_policy: str) -> None:
    if ip_policy not in _IP_POLICIES:
        raise ValueError(f"ip_policy must be one of {_IP_POLICIES}, got {ip_policy!r}")


def _parse_ip(ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id:  # "fe80::1%eth0": Postgres inet rejects the zone
            return ipaddress.IPv6Address(int(addr))
    return addr


def _apply_policy(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, policy: str) -> str | None:
    if addr is None or policy == "none":
        return None
    if policy == "truncated":  # IPv4 /24, IPv6 /48
        host_bits = 8 if addr.version == 4 else 80
        return str(type(addr)(int(addr) >> host_bits << host_bits))
    return str(addr)


@functools.lru_cache(maxsize=10_000)
def _referrer_domain(referrer: str | None) -> str | None:
    if not referrer:
        return None
    try:
        host = urlsplit(referrer.strip()).hostname
    except ValueError:  # e.g. an unclosed "[" in an IPv6 host
        return None
    if not host or any(c.isspace() for c in host):
        return None
    host = host.rstrip(".")
    return host.removeprefix("www.") or None
