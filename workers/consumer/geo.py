"""geoip2fast's country and AS tables, held compactly.

geoip2fast unpickles its data file into lists of Python ints (~1.4 million networks: a
first address, a country or AS index and a prefix length each, as separate int objects):
~110 MB of the worker's resident memory, for ~30 MB of numbers. ``GeoTable`` holds the
same networks in flat arrays (each first address as two 64-bit halves) and answers what
``Enricher`` asked geoip2fast: the country code and the AS organisation of an address,
with geoip2fast's own answers (the equality is tested over every network boundary).

The data file is unpickled in a child process, which writes the arrays into a temporary
file: the lists never exist in the worker, so neither its resident set nor its peak
(VmHWM) ever holds them. Nothing is downloaded; the file is the one in geoip2fast's wheel.
"""

from __future__ import annotations

import bisect
import pickle
import subprocess
import sys
import tempfile
from array import array
from dataclasses import dataclass
from typing import Any, BinaryIO

# The only bundled file with both IPv6 and AS data (the default file is IPv4 country only).
# Its AS data holds organisation names, not numbers: geoip2dat drops the number when it
# builds the file, so an enrichment's `asn` stays None unless the City .mmdb carries it.
GEOIP_FILE = "geoip2fast-asn-ipv6.dat.gz"
_PRIVATE_IDS = 16  # geoip2fast: country indexes below this are private/reserved networks
_MAX_IPV4 = 2**32 - 1
_LOW = 2**64 - 1


@dataclass(frozen=True, slots=True)
class _Networks:
    """Sorted networks: first address (high and low 64 bits), value index, prefix length."""

    hi: array[int]
    lo: array[int]
    ids: array[int]
    lengths: array[int]

    def find(self, ip: int) -> int:
        """Index of the last network starting at or before ``ip``; -1 if none does."""
        h, low = ip >> 64, ip & _LOW
        start, end = bisect.bisect_left(self.hi, h), bisect.bisect_right(self.hi, h)
        return bisect.bisect_right(self.lo, low, start, end) - 1

    def first(self, i: int) -> int:
        return self.hi[i] << 64 | self.lo[i]


class GeoTable:
    """Country code and AS organisation by address (an int), as geoip2fast looks them up."""

    def __init__(
        self, source_info: str, countries: list[str], as_names: list[str], country_nets: _Networks, as_nets: _Networks
    ) -> None:
        self.source_info = source_info
        self._countries = countries  # "US:United States", indexed by the country networks' ids
        self._as_names = as_names
        self._country_nets = country_nets
        self._as_nets = as_nets

    def lookup(self, ip: int) -> tuple[str | None, str | None]:
        """(country code, AS organisation) of a global address; None where geoip2fast has
        none, or calls the network private or reserved (its "--" answers)."""
        nets = self._country_nets
        i = nets.find(ip)
        if i < 0:
            return None, None
        span_bits = (32 if ip <= _MAX_IPV4 else 128) - nets.lengths[i]
        if ip > nets.first(i) + (1 << span_bits) - 1:
            return None, None  # in no network: geoip2fast answers "not found", without AS
        cid = nets.ids[i]
        if cid < _PRIVATE_IDS:
            return None, None
        code = self._countries[cid].split(":", 1)[0]
        return (code if len(code) == 2 and code.isalpha() else None), self._as_name(ip)

    def _as_name(self, ip: int) -> str | None:
        nets = self._as_nets
        i = nets.find(ip)
        if i < 0:
            return None
        # geoip2fast measures every AS network as an IPv6 one (its ``ipv6`` flag is set for
        # this file), so an IPv4 address past the end of its AS network still gets that AS:
        # kept as it is, so the enrichment does not change with the representation
        if ip > nets.first(i) + (1 << (128 - nets.lengths[i])) - 1:
            return None
        return self._as_names[nets.ids[i]] or None


def load() -> GeoTable:
    """The bundled tables, unpickled by a child process (see the module docstring)."""
    with tempfile.TemporaryFile() as out:
        code = (
            f"import sys; sys.path[:] = {[p for p in sys.path if p]!r}; from workers.consumer.geo import _dump; _dump()"
        )
        # geoip2fast sets PYTHONWARNINGS in the environment of whoever imports it: only the child's
        subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=out, check=True)
        out.seek(0)
        return _read(out)


def _dump() -> None:
    """In the child: geoip2fast's tables, flattened, to stdout (a file, not a pipe)."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # whatever else prints goes to the log, not into the tables
    from geoip2fast import GeoIP2Fast
    from geoip2fast import geoip2fast as g

    geo = GeoIP2Fast(geoip2fast_data_file=GEOIP_FILE)
    if not (geo.country and geo.asn and geo.ipv6):
        raise RuntimeError(f"{GEOIP_FILE}: expected country, AS and IPv6 data, got {geo.source_info}")
    country = _flatten(g.mainIndex, g.mainListFirstIP, g.mainListIDCountryCodes, g.mainListNetlength, "H")
    asn = _flatten(g.mainIndexASN, g.mainListFirstIPASN, g.mainListIDASN, g.mainListNetlengthASN, "I")
    header = {
        "source_info": str(geo.source_info),
        "countries": list(g.mainListNamesCountry),
        "as_names": list(g.mainListNamesASN),
        "sizes": [len(country.hi), len(asn.hi)],
    }
    pickle.dump(header, out, protocol=pickle.HIGHEST_PROTOCOL)
    for nets in (country, asn):
        for a in (nets.hi, nets.lo, nets.ids, nets.lengths):
            a.tofile(out)
    out.flush()


def _flatten(
    index: list[int], firsts: list[list[int]], ids: list[list[int]], lengths: list[list[int]], id_code: str
) -> _Networks:
    # geoip2fast bisects its chunk index, then the chunk: one bisect over the chunks joined
    # finds the same network, as each chunk starts with its index entry and the chunks are in order
    if [c[0] for c in firsts] != index:
        raise RuntimeError("geoip2fast's chunk index does not match its chunks")
    nets = _Networks(array("Q"), array("Q"), array(id_code), array("B"))
    previous = -1
    for chunk, chunk_ids, chunk_lengths in zip(firsts, ids, lengths, strict=True):
        for first in chunk:
            if first <= previous:
                raise RuntimeError("geoip2fast's networks are not in order")
            previous = first
            nets.hi.append(first >> 64)
            nets.lo.append(first & _LOW)
        nets.ids.extend(chunk_ids)
        nets.lengths.extend(chunk_lengths)
    return nets


def _read(f: BinaryIO) -> GeoTable:
    header: dict[str, Any] = pickle.load(f)
    sets = []
    for size, id_code in zip(header["sizes"], ("H", "I"), strict=True):
        parts = [array(code) for code in ("Q", "Q", id_code, "B")]
        for a in parts:
            a.fromfile(f, size)
        sets.append(_Networks(*parts))
    if f.read(1):
        raise RuntimeError("geo tables: trailing data")
    return GeoTable(header["source_info"], header["countries"], header["as_names"], *sets)
