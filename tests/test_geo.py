"""workers.consumer.geo: geoip2fast's tables held compactly answer as geoip2fast itself does.

No Redis or Postgres. geoip2fast is loaded here (in this test process) as the reference.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from workers.consumer import geo


@pytest.fixture(scope="module")
def table() -> geo.GeoTable:
    return geo.load()


@pytest.fixture(scope="module")
def reference() -> Any:
    saved = os.environ.get("PYTHONWARNINGS")  # geoip2fast sets it on import
    from geoip2fast import GeoIP2Fast

    if saved is None:
        os.environ.pop("PYTHONWARNINGS", None)
    else:
        os.environ["PYTHONWARNINGS"] = saved
    return GeoIP2Fast(geoip2fast_data_file=geo.GEOIP_FILE)


def _answer(reference: Any, ip: int) -> tuple[str | None, str | None]:
    """What Enricher made of geoip2fast's answer before the tables were compacted."""
    hit = reference.lookup(str(ipaddress.ip_address(ip)))
    if hit.is_private:
        return None, None
    country = hit.country_code if len(hit.country_code) == 2 and hit.country_code.isalpha() else None
    return country, hit.asn_name or None


def test_answers_as_geoip2fast_at_network_boundaries_and_at_random(table: geo.GeoTable, reference: Any) -> None:
    from geoip2fast import geoip2fast as g  # its tables, loaded by ``reference``

    rng = random.Random(7)
    addresses: set[int] = set()
    for chunks in (g.mainListFirstIP, g.mainListFirstIPASN):
        firsts = [first for chunk in chunks for first in chunk]
        # each side of a boundary: the last address of one network (or gap), the first of the next
        for first in rng.sample(firsts, 5000) + firsts[:50] + firsts[-50:]:
            addresses.update((first - 1, first, first + 1))
    addresses.update(rng.randrange(2**32) for _ in range(20000))  # IPv4
    addresses.update(rng.randrange(2**125, 2**126) for _ in range(10000))  # global IPv6 unicast (2000::/3)
    addresses.update((2**32 - 1, 2**128 - 1))
    found = {"country": 0, "as_name": 0}
    for ip in sorted(a for a in addresses if 0 <= a < 2**128):
        expected = _answer(reference, ip)
        assert table.lookup(ip) == expected, ipaddress.ip_address(ip)
        found["country"] += expected[0] is not None
        found["as_name"] += expected[1] is not None
    # the comparison covered real answers, not only "nothing known"
    assert found["country"] > 10000 and found["as_name"] > 10000


@pytest.mark.parametrize(
    ("ip", "country", "as_name"),
    [("8.8.8.8", "US", "GOOGLE"), ("2001:4860:4860::8888", "US", "GOOGLE"), ("10.0.0.1", None, None)],
)
def test_known_addresses(table: geo.GeoTable, ip: str, country: str | None, as_name: str | None) -> None:
    assert table.lookup(int(ipaddress.ip_address(ip))) == (country, as_name)


def test_the_worker_process_never_holds_geoip2fast() -> None:
    # geoip2fast's lists (~110 MB resident) are unpickled in a child only: a fresh process
    # that builds an Enricher has the tables without ever importing geoip2fast
    code = (
        "import sys; from workers.consumer.enrich import Enricher; e = Enricher();"
        "assert e.enrich('8.8.8.8', None, None).country == 'US';"
        "print(sorted(m for m in sys.modules if m.startswith('geoip2fast')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
