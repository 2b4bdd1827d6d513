"""workers.consumer.enrich against the real bundled data (geoip2fast GeoLite2 snapshot, ua-parser regexes).

No Redis or Postgres: none of conftest's fixtures are used. The expected countries and AS
names come from the GeoLite2 snapshot bundled in geoip2fast 1.2.2 (2024-06-18); a geoip2fast
upgrade ships a new snapshot and may move some of them (check `versions["geoip2fast_data"]`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from workers.consumer.enrich import EnrichConfigError, Enricher, Enrichment

CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)


@pytest.fixture(scope="module")
def enricher() -> Enricher:
    return Enricher()


# (user agent, browser, os, device_type, bot_reason)
UAS = [
    pytest.param(CHROME_WIN, "Chrome", "Windows", "desktop", None, id="chrome-windows"),
    pytest.param(
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4.1 Safari/605.1.15",
        "Safari",
        "Mac OS X",
        "desktop",
        None,
        id="safari-macos",
    ),
    pytest.param(
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4.1 Mobile/15E148 Safari/604.1",
        "Mobile Safari",
        "iOS",
        "mobile",
        None,
        id="safari-iphone",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/112.0.0.0 Mobile Safari/537.36",
        "Chrome Mobile",
        "Android",
        "mobile",
        None,
        id="chrome-android-phone",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Mobile Safari/537.36",
        "Chrome Mobile",
        "Android",
        "mobile",
        None,
        id="chrome-android-reduced-ua",
    ),
    pytest.param(
        "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/16.6 Mobile/15E148 Safari/604.1",
        "Mobile Safari",
        "iOS",
        "tablet",
        None,
        id="safari-ipad",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36",
        "Chrome",
        "Android",
        "tablet",
        None,
        id="chrome-android-tablet",
    ),
    pytest.param(
        # Chrome's reduced UA on a tablet: no model, no "Mobile" token
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Android",
        "tablet",
        None,
        id="chrome-android-tablet-reduced-ua",
    ),
    pytest.param(
        # a brand the regexes know without a tablet hint: only the missing "Mobile" token tells
        "Mozilla/5.0 (Linux; U; Android 4.0.3; en-us; KFTT Build/IML74K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/3.68 like Chrome/39.0.2171.93 Safari/537.36",
        "Amazon Silk",
        "Android",
        "tablet",
        None,
        id="silk-kindle-fire",
    ),
    pytest.param(
        "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
        "Firefox Mobile",
        "Android",
        "mobile",
        None,
        id="firefox-android-phone",
    ),
    pytest.param(
        "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Firefox",
        "Linux",
        "desktop",
        None,
        id="firefox-linux",
    ),
    pytest.param(
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Chrome OS",
        "desktop",
        None,
        id="chrome-chromeos",
    ),
    pytest.param(
        CHROME_WIN + " Edg/124.0.2478.80",
        "Edge",
        "Windows",
        "desktop",
        None,
        id="edge-windows",
    ),
    pytest.param(
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Googlebot",
        None,
        "bot",
        "ua_spider",
        id="googlebot",
    ),
    pytest.param(
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.6367.201 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Googlebot",
        "Android",
        "bot",
        "ua_spider",
        id="googlebot-smartphone",
    ),
    pytest.param(
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "bingbot",
        None,
        "bot",
        "ua_spider",
        id="bingbot",
    ),
    pytest.param("curl/8.5.0", "curl", None, "bot", "ua_list", id="curl"),
    pytest.param("python-requests/2.31.0", "Python Requests", None, "bot", "ua_list", id="python-requests"),
    pytest.param("Go-http-client/1.1", "Go-http-client", None, "bot", "ua_list", id="go-http-client"),
    pytest.param("Python/3.11 aiohttp/3.9.5", "Python aiohttp", None, "bot", "ua_list", id="aiohttp"),
    pytest.param("okhttp/4.12.0", "okhttp", None, "bot", "ua_list", id="okhttp"),
    pytest.param(
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.6367.60 Safari/537.36",
        "HeadlessChrome",
        "Linux",
        "bot",
        "ua_list",
        id="headless-chrome",
    ),
    pytest.param(
        # the regexes call this plain Chrome; only the own list catches it
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36 Chrome-Lighthouse",
        "Chrome",
        "Mac OS X",
        "bot",
        "ua_list",
        id="lighthouse",
    ),
    pytest.param(
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        "FacebookBot",
        None,
        "bot",
        "ua_spider",
        id="facebookexternalhit",
    ),
    pytest.param(
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        "Slackbot-LinkExpanding",
        None,
        "bot",
        "ua_spider",
        id="slackbot-linkexpanding",
    ),
    pytest.param("", None, None, "other", "ua_missing", id="empty"),
    pytest.param("   ", None, None, "other", "ua_missing", id="blank"),
    pytest.param(None, None, None, "other", "ua_missing", id="missing"),
]


@pytest.mark.parametrize(("ua", "browser", "os_family", "device_type", "bot_reason"), UAS)
def test_user_agents(
    enricher: Enricher,
    ua: str | None,
    browser: str | None,
    os_family: str | None,
    device_type: str,
    bot_reason: str | None,
) -> None:
    e = enricher.enrich(None, ua, None)
    assert (e.browser, e.os, e.device_type) == (browser, os_family, device_type)
    assert e.bot_reason == bot_reason
    assert e.is_bot is (bot_reason is not None)


def test_user_agent_details(enricher: Enricher) -> None:
    e = enricher.enrich(
        None,
        "Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/112.0.0.0 Mobile Safari/537.36",
        None,
    )
    assert (e.browser_version, e.os_version) == ("112.0.0", "13")
    assert (e.device_brand, e.device_model) == ("Samsung", "SM-S918B")
    # placeholder brands from the regexes ("Generic_Android", "Spider") are not stored
    reduced = enricher.enrich(None, "Mozilla/5.0 (Linux; Android 10; K) Chrome/124.0.0.0 Mobile Safari/537.36", None)
    assert reduced.device_brand is None
    bot = enricher.enrich(None, "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", None)
    assert bot.device_brand is None


# (ip, country, as_name, bot_reason with an ordinary desktop browser UA)
PUBLIC_IPS = [
    pytest.param("8.8.8.8", "US", "GOOGLE", "datacenter_asn", id="google-v4"),
    pytest.param("2001:4860:4860::8888", "US", "GOOGLE", "datacenter_asn", id="google-v6"),
    pytest.param("52.95.110.1", "US", "AMAZON-02", "datacenter_asn", id="aws"),
    pytest.param("2a01:4f8::1", "DE", "Hetzner Online GmbH", "datacenter_asn", id="hetzner-v6"),
    pytest.param("24.24.24.24", "US", "TWC-11351-NORTHEAST", None, id="residential-us"),
    pytest.param("89.160.20.112", "SE", "Bredband2 AB", None, id="residential-se"),
    pytest.param("2003::1", "DE", "Deutsche Telekom AG", None, id="residential-v6"),
    # Cloudflare is deliberately not a datacenter: WARP/1.1.1.1 users browse from it
    pytest.param("1.1.1.1", "AU", "CLOUDFLARENET", None, id="cloudflare"),
    pytest.param("::ffff:8.8.8.8", "US", "GOOGLE", "datacenter_asn", id="ipv4-mapped"),
]


@pytest.mark.parametrize(("ip", "country", "as_name", "bot_reason"), PUBLIC_IPS)
def test_public_ips(enricher: Enricher, ip: str, country: str, as_name: str, bot_reason: str | None) -> None:
    e = enricher.enrich(ip, CHROME_WIN, None)
    assert (e.country, e.as_name) == (country, as_name)
    assert e.bot_reason == bot_reason
    assert e.is_bot is (bot_reason is not None)
    # the bundled data has AS names only; numbers come from a City .mmdb that carries them
    assert e.asn is None
    assert (e.city, e.region, e.latitude, e.longitude) == (None, None, None, None)
    assert e.device_type == "desktop"  # a datacenter IP does not change what the UA says


def test_a_bot_ua_keeps_its_own_reason_on_a_datacenter_ip(enricher: Enricher) -> None:
    assert enricher.enrich("8.8.8.8", "curl/8.5.0", None).bot_reason == "ua_list"


# (ip, what is stored under ip_policy="full")
NO_GEO_IPS = [
    pytest.param("10.0.0.1", "10.0.0.1", id="private-a"),
    pytest.param("192.168.1.1", "192.168.1.1", id="private-c"),
    pytest.param("172.16.5.4", "172.16.5.4", id="private-b"),
    pytest.param("127.0.0.1", "127.0.0.1", id="loopback-v4"),
    pytest.param("::1", "::1", id="loopback-v6"),
    pytest.param("fe80::1%eth0", "fe80::1", id="link-local-scoped"),
    pytest.param("fc00::1", "fc00::1", id="ula-v6"),
    pytest.param("100.64.0.1", "100.64.0.1", id="cgnat"),
    pytest.param("169.254.1.1", "169.254.1.1", id="link-local-v4"),
    pytest.param("224.0.0.1", "224.0.0.1", id="multicast"),
    pytest.param("192.0.2.1", "192.0.2.1", id="documentation"),
    pytest.param("2001:db8::1", "2001:db8::1", id="documentation-v6"),
    pytest.param("0.0.0.0", "0.0.0.0", id="unspecified"),
    pytest.param("ff02::1", "ff02::1", id="multicast-v6"),
    # global to ipaddress, special to geoip2fast: its "--"/IANA.ORG answers are not geo
    pytest.param("192.88.99.1", "192.88.99.1", id="6to4-relay-anycast"),
    pytest.param("2002::1", "2002::1", id="6to4-unallocated"),
    pytest.param("999.1.1.1", None, id="malformed-octet"),
    pytest.param("not-an-ip", None, id="malformed-text"),
    pytest.param("1.2.3", None, id="malformed-short"),
    pytest.param("", None, id="empty"),
    pytest.param(None, None, id="missing"),
]


@pytest.mark.parametrize(("ip", "stored"), NO_GEO_IPS)
def test_no_geo(enricher: Enricher, ip: str | None, stored: str | None) -> None:
    e = enricher.enrich(ip, CHROME_WIN, None)
    assert e.ip == stored
    assert (e.country, e.asn, e.as_name) == (None, None, None)
    assert not e.is_bot


@pytest.mark.parametrize(
    ("ip", "policy", "stored"),
    [
        ("203.0.113.77", "full", "203.0.113.77"),
        (" 8.8.4.4 ", "full", "8.8.4.4"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", "full", "2001:db8::1"),
        ("::ffff:8.8.8.8", "full", "8.8.8.8"),
        ("203.0.113.77", "truncated", "203.0.113.0"),
        ("8.8.8.8", "truncated", "8.8.8.0"),
        ("2001:4860:4860::8888", "truncated", "2001:4860:4860::"),
        ("2001:db8:abcd:12:34:56:78:9", "truncated", "2001:db8:abcd::"),
        ("8.8.8.8", "none", None),
        ("2001:4860:4860::8888", "none", None),
    ],
)
def test_ip_policy(enricher: Enricher, ip: str, policy: str, stored: str | None) -> None:
    assert enricher.enrich(ip, CHROME_WIN, None, ip_policy=policy).ip == stored


def test_ip_policy_does_not_change_geo(enricher: Enricher) -> None:
    e = enricher.enrich("8.8.8.8", CHROME_WIN, None, ip_policy="none")
    assert (e.ip, e.country, e.as_name) == (None, "US", "GOOGLE")


def test_unknown_ip_policy_is_refused(enricher: Enricher) -> None:
    with pytest.raises(ValueError, match="ip_policy"):
        enricher.enrich("8.8.8.8", CHROME_WIN, None, ip_policy="anonymous")


@pytest.mark.parametrize(
    ("referrer", "domain"),
    [
        ("https://www.Example.COM/path?q=1#x", "example.com"),
        ("http://news.ycombinator.com/item?id=1", "news.ycombinator.com"),
        ("https://user:pw@Shop.Example.co.uk:8443/", "shop.example.co.uk"),
        ("https://www.example.com./", "example.com"),
        ("https://wwwexample.com/", "wwwexample.com"),
        ("android-app://com.google.android.gm/", "com.google.android.gm"),
        ("https://[2001:db8::1]/x", "2001:db8::1"),
        ("https://[2001:db8::1/x", None),
        ("example.com/no-scheme", None),
        ("not a url", None),
        ("https://", None),
        ("", None),
        (None, None),
    ],
)
def test_referrer_domain(enricher: Enricher, referrer: str | None, domain: str | None) -> None:
    assert enricher.enrich(None, CHROME_WIN, referrer).referrer_domain == domain


def test_versions(enricher: Enricher) -> None:
    versions = enricher.enrich("8.8.8.8", CHROME_WIN, None).versions
    assert set(versions) == {"geoip2fast", "geoip2fast_data", "ua-parser", "ua-parser-rs", "ua-parser-builtins"}
    assert all(versions.values())
    assert "CountryASN-IPv4IPv6" in versions["geoip2fast_data"]
    assert versions["ua-parser"].startswith("1.")
    with pytest.raises(TypeError):
        versions["geoip2fast"] = "tampered"  # type: ignore[index]  # the write the test expects refused


def test_to_json(enricher: Enricher) -> None:
    e = enricher.enrich("8.8.8.8", CHROME_WIN, "https://www.example.com/")
    doc = e.to_json()
    assert list(doc) == [f.name for f in dataclasses.fields(Enrichment)]
    assert type(doc["versions"]) is dict
    assert orjson.loads(orjson.dumps(doc)) == doc
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.country = "FR"  # type: ignore[misc]  # the write the test expects refused


def test_ua_cache_is_used() -> None:
    enricher = Enricher(ua_cache_size=2)
    first = enricher.enrich(None, CHROME_WIN, None)
    assert enricher.ua_cache_info()[:2] == (0, 1)  # (hits, misses)
    assert enricher.enrich("8.8.8.8", CHROME_WIN, None).browser == first.browser
    assert enricher.ua_cache_info()[:2] == (1, 1)
    enricher.enrich(None, "curl/8.5.0", None)
    enricher.enrich(None, "Wget/1.21.4", None)  # evicts CHROME_WIN from a cache of two
    enricher.enrich(None, CHROME_WIN, None)
    info = enricher.ua_cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 4, 2)
    # no UA never reaches the parser or the cache
    enricher.enrich(None, None, None)
    assert enricher.ua_cache_info()[:2] == (1, 4)


def test_ip_cache_is_per_address_and_policy() -> None:
    enricher = Enricher(ip_cache_size=8)
    full = enricher.enrich("8.8.8.8", None, None)
    again = enricher.enrich("8.8.8.8", None, None)
    assert enricher.ip_cache_info()[:2] == (1, 1)  # (hits, misses)
    assert again == full and full.country == "US"
    # the stored address depends on the workspace's policy: a cached "full" answer must not leak
    truncated = enricher.enrich("8.8.8.8", None, None, "truncated")
    assert (truncated.ip, truncated.country) == ("8.8.8.0", "US")
    assert enricher.enrich("8.8.8.8", None, None, "none").ip is None
    assert enricher.ip_cache_info()[:2] == (1, 3)
    enricher.enrich(None, None, None)  # no address: never reaches the cache
    assert enricher.ip_cache_info()[:2] == (1, 3)


# User-Agents a cache could mix up: browsers, devices, declared and undeclared bots, one
# padded, one a prefix of another, junk, unicode and control bytes
VARIED_UAS: list[str | None] = [
    *(str(p.values[0]) for p in UAS),
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.0.0 Safari/537.36",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "facebookexternalhit/1.1",
    f"  {CHROME_WIN}  ",
    CHROME_WIN[:40],
    "Mozilla/5.0",
    "x",
    "日本語のブラウザ/1.0",
    "tab\there",
    None,
    "   ",
]
# addresses a cache could mix up: public v4 and v6, a datacenter, the same address spelled
# three ways, neighbours in one /24, private, reserved, unallocated and malformed
VARIED_IPS: list[str | None] = [
    "8.8.8.8",
    " 8.8.8.8 ",
    "::ffff:8.8.8.8",
    "8.8.8.9",
    "81.7.13.1",
    "81.7.13.2",
    "93.184.216.34",
    "185.60.216.35",
    "2a00:1450:4001:80b::200e",
    "2001:4860:4860::8888",
    "10.0.0.1",
    "fe80::1%eth0",
    "100.64.0.1",
    "192.88.99.1",
    "2002::1",
    "999.1.1.1",
    "not-an-ip",
    "",
    None,
]


def _uncached() -> Enricher:
    return Enricher(ua_cache_size=0, ip_cache_size=0)  # functools.lru_cache(maxsize=0) keeps nothing


def test_a_ua_cache_hit_is_what_a_parse_gives() -> None:
    cached, uncached = Enricher(), _uncached()
    for _ in range(2):  # the second round from the cache
        for ua in VARIED_UAS:
            assert cached.enrich("81.7.13.1", ua, None) == uncached.enrich("81.7.13.1", ua, None), ua
            assert cached.enrich_row("81.7.13.1", ua, None).doc == uncached.enrich_row("81.7.13.1", ua, None).doc
    info = cached.ua_cache_info()
    assert info.hits >= len(VARIED_UAS) and info.misses <= len(VARIED_UAS)
    assert uncached.ua_cache_info().currsize == 0


@pytest.mark.parametrize("policy", ["full", "truncated", "none"])
def test_an_ip_cache_hit_is_what_a_lookup_gives(policy: str) -> None:
    cached, uncached = Enricher(), _uncached()
    for _ in range(2):
        for ip in VARIED_IPS:
            assert cached.enrich(ip, CHROME_WIN, None, policy) == uncached.enrich(ip, CHROME_WIN, None, policy), ip
            assert cached.stored_ip(ip, policy) == uncached.enrich(ip, None, None, policy).ip
    assert cached.ip_cache_info().hits >= len(VARIED_IPS)


def test_the_caches_keep_their_bound() -> None:
    enricher = Enricher(ua_cache_size=3, ip_cache_size=3)
    for i in range(20):
        enricher.enrich(f"81.7.13.{i + 1}", f"curl/8.{i}.0", None)
    assert (enricher.ua_cache_info().currsize, enricher.ip_cache_info().currsize) == (3, 3)
    assert (enricher.ua_cache_info().maxsize, enricher.ip_cache_info().maxsize) == (3, 3)


def test_stored_ip_refuses_an_unknown_policy(enricher: Enricher) -> None:
    with pytest.raises(ValueError, match="ip_policy"):
        enricher.stored_ip("8.8.8.8", "anonymous")


def test_loading_leaves_the_environment_alone() -> None:
    # geoip2fast writes PYTHONWARNINGS=ignore into os.environ on import; a fresh process shows
    # whether Enricher() puts it back (this test process has imported geoip2fast already).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    code = (
        "import os; from workers.consumer.enrich import Enricher; Enricher(); print(os.environ.get('PYTHONWARNINGS'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"


def test_missing_city_db_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(EnrichConfigError, match="no such file") as err:
        Enricher(city_db=str(tmp_path / "GeoLite2-City.mmdb"))
    # not an OSError: workers.group.errors would take that for transient and retry forever
    assert not isinstance(err.value, OSError)


def test_unreadable_city_db_fails_at_construction(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a maxmind database" * 10)
    with pytest.raises(EnrichConfigError, match=r"not a readable \.mmdb"):
        Enricher(city_db=str(junk))


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    mmdb_writer = pytest.importorskip("mmdb_writer", reason="mmdb-writer writes the test .mmdb")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City-Test")
    mountain_view = {
        "city": {"names": {"en": "Mountain View"}},
        "subdivisions": [{"iso_code": "CA", "names": {"en": "California"}}],
        "country": {"iso_code": "US"},
        "location": {"latitude": 37.386, "longitude": -122.0838},
        "traits": {"autonomous_system_number": 15169},
    }
    writer.insert_network(IPSet(["8.8.8.0/24", "2001:4860::/32"]), mountain_view)
    # a residential address whose bundled AS name is not a datacenter, but whose number is
    writer.insert_network(
        IPSet(["24.24.24.0/24"]),
        {"city": {"names": {"en": "Syracuse"}}, "traits": {"autonomous_system_number": 16509}},
    )
    writer.insert_network(IPSet(["89.160.20.0/24"]), {"country": {"iso_code": "NO"}})
    writer.insert_network(IPSet(["2002::/16"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["10.0.0.0/8"]), {"city": {"names": {"en": "Nowhere"}}})
    path = tmp_path_factory.mktemp("mmdb") / "city.mmdb"
    writer.to_db_file(str(path))
    return str(path)


def test_city_db(city_db: str) -> None:
    enricher = Enricher(city_db=city_db)
    try:
        assert enricher.versions["city_db"].startswith("GeoIP2-City-Test@")
        for ip in ("8.8.8.8", "2001:4860:4860::8888"):
            e = enricher.enrich(ip, CHROME_WIN, None)
            assert (e.city, e.region, e.latitude, e.longitude) == ("Mountain View", "California", 37.386, -122.0838)
            assert (e.country, e.asn, e.bot_reason) == ("US", 15169, "datacenter_asn")
        # the AS number from the .mmdb flags a datacenter the bundled AS name does not
        home = enricher.enrich("24.24.24.24", CHROME_WIN, None)
        assert (home.city, home.asn, home.as_name, home.bot_reason) == (
            "Syracuse",
            16509,
            "TWC-11351-NORTHEAST",
            "datacenter_asn",
        )
        # the .mmdb's country wins over the bundled one (SE), and fills in where that has none
        assert enricher.enrich("89.160.20.112", CHROME_WIN, None).country == "NO"
        assert enricher.enrich("2002::1", CHROME_WIN, None).country == "DE"
        # not in the .mmdb: the country still comes from the bundled data
        other = enricher.enrich("2003::1", CHROME_WIN, None)
        assert (other.country, other.city, other.asn) == ("DE", None, None)
        # private addresses are never looked up, even when the database has them
        assert enricher.enrich("10.1.2.3", CHROME_WIN, None).city is None
    finally:
        enricher.close()


def test_ipv4_only_city_db_answers_ipv6_with_nothing(tmp_path: Path) -> None:
    mmdb_writer = pytest.importorskip("mmdb_writer", reason="mmdb-writer writes the test .mmdb")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=4, database_type="GeoIP2-City-Test")
    writer.insert_network(IPSet(["8.8.8.0/24"]), {"city": {"names": {"en": "Mountain View"}}})
    path = tmp_path / "v4.mmdb"
    writer.to_db_file(str(path))
    enricher = Enricher(city_db=str(path))
    try:
        assert enricher.enrich("8.8.8.8", CHROME_WIN, None).city == "Mountain View"
        v6 = enricher.enrich("2001:4860:4860::8888", CHROME_WIN, None)
        assert (v6.city, v6.country, v6.as_name) == (None, "US", "GOOGLE")
    finally:
        enricher.close()


@pytest.mark.parametrize(
    ("ip", "ua", "referrer", "policy"),
    [
        pytest.param("8.8.8.8", CHROME_WIN, "https://www.example.com/", "full", id="datacenter"),
        pytest.param("81.7.13.1", CHROME_WIN, None, "truncated", id="truncated"),
        pytest.param("2a00:1450::1", "curl/8.5.0", "not a url", "none", id="v6-bot-none"),
        pytest.param(None, None, None, "full", id="nothing"),
        pytest.param("10.0.0.1", "  ", "https://[::1/", "full", id="private-blank-ua"),
    ],
)
def test_enrich_row_is_enrich(
    enricher: Enricher, ip: str | None, ua: str | None, referrer: str | None, policy: str
) -> None:
    # what the store writes is what enrich() says, twice over (the second from the caches)
    for _ in range(2):
        full, row = enricher.enrich(ip, ua, referrer, policy), enricher.enrich_row(ip, ua, referrer, policy)
        assert row.doc == full.to_json()
        assert list(row.doc) == list(full.to_json())
        assert (row.ip, row.country, row.asn, row.is_bot, row.bot_reason) == (
            full.ip,
            full.country,
            full.asn,
            full.is_bot,
            full.bot_reason,
        )
    # the cached parts are never handed out: changing one row's doc changes no other
    row.doc["country"] = "XX"
    row.doc["versions"]["geoip2fast"] = "tampered"
    assert enricher.enrich_row(ip, ua, referrer, policy).doc == enricher.enrich(ip, ua, referrer, policy).to_json()
