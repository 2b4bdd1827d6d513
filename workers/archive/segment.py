"""The archive's segment format: immutable, compressed, one partition and one hour each.

A segment is a zstandard frame holding JSON lines. The first line is the manifest::

    {"manifest": {"format": 1, "partition": 2, "first_id": "1790000000000-0",
                  "last_id": "1790000000999-3", "first_time": "2026-09-21T...Z",
                  "last_time": "...", "count": 1200, "sha256": "<hex>"}}

``sha256`` is over the raw (uncompressed) bytes of the entry lines, every byte after the
manifest line, so a reader checks what it decoded. Each entry line holds the stream id and
the entry's envelope exactly as it was in the stream::

    {"id":"1790000000000-0","e":<the envelope's bytes, verbatim>}

(the envelope is compact JSON: no newline in it). Every other entry keeps all its fields,
verbatim, base64-encoded under ``"b64"``: the edge's version-3 entries (one binary field:
``ingest.contract.wire``) and version-2 ones (fixed fields, some binary), version-1 entries
(their ``e`` is a JSON array, not an object), and poison the edge never wrote but another
producer might. Names are deterministic, ``<prefix>/dt=<day>/hour=<hh>/<partition>-<first
id>-<last id>.jsonl.zst``: a segment written twice (an archiver died
after the upload and before its XACK) is the same object, overwritten with the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import zstandard

from ingest.contract.errors import Refused
from ingest.contract.keys import parse_id
from ingest.contract.wire import FIELD

FORMAT = 1
SUFFIX = ".jsonl.zst"
LEVEL = 3  # zstandard's default: ~5x on envelopes at a few hundred MB/s per core
_NAME = re.compile(r"(?:^|/)(\d+)-(\d+-\d+)-(\d+-\d+)\.jsonl\.zst$")
StreamId = tuple[int, int]


class SegmentError(Refused, ValueError):
    """A segment that does not decode, or whose checksum does not match its lines."""


@dataclass(frozen=True, slots=True)
class Manifest:
    partition: int
    first_id: str
    last_id: str
    first_time: str
    last_time: str
    count: int
    sha256: str
    format: int = FORMAT


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    envelope: bytes | None  # the stream's envelope field, verbatim (None: an entry without one)
    fields: dict[bytes, bytes] | None = None  # every entry's fields but the one-``e``-object form


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hour_of(stream_id: Any) -> str:
    """``dt=2026-11-22/hour=13``: the folder of the hour an entry was appended in."""
    at = datetime.fromtimestamp(parse_id(stream_id)[0] / 1000, UTC)
    return f"dt={at:%Y-%m-%d}/hour={at:%H}"


def name(prefix: str, partition: int, first_id: str, last_id: str) -> str:
    return f"{prefix}/{hour_of(first_id)}/{partition}-{first_id}-{last_id}{SUFFIX}"


def parse_name(key: str) -> tuple[int, StreamId, StreamId] | None:
    """(partition, first id, last id) of a segment key; None for anything else."""
    m = _NAME.search(key)
    if m is None:
        return None
    return int(m[1]), parse_id(m[2]), parse_id(m[3])


def line(stream_id: str, fields: dict[bytes, bytes]) -> bytes:
    env = fields.get(FIELD) if fields else None
    if env is not None and len(fields) == 1 and env[:1] == b"{" and b"\n" not in env:
        return b'{"id":"' + stream_id.encode() + b'","e":' + env + b"}\n"
    b64 = {base64.b64encode(k).decode(): base64.b64encode(v).decode() for k, v in (fields or {}).items()}
    # the entry as bytes (base64), never its decoded payload: no client document's depth reaches orjson here
    return orjson.dumps({"id": stream_id, "b64": b64}) + b"\n"


def _entry(raw: bytes) -> Entry:
    if raw.startswith(b'{"id":"'):
        end = raw.index(b'"', 7)
        sid = raw[7:end].decode()
        rest = raw[end + 1 :]
        if rest.startswith(b',"e":') and rest.endswith(b"}"):
            return Entry(sid, rest[5:-1])
    doc = orjson.loads(raw)
    fields = {base64.b64decode(k): base64.b64decode(v) for k, v in doc.get("b64", {}).items()}
    return Entry(str(doc["id"]), fields.get(FIELD), fields)


def build(partition: int, entries: list[tuple[str, dict[bytes, bytes]]]) -> tuple[Manifest, bytes]:
    """The manifest and the compressed bytes of a segment of ``entries`` (in id order)."""
    body = b"".join(line(sid, fields) for sid, fields in entries)
    first, last = entries[0][0], entries[-1][0]
    manifest = Manifest(
        partition,
        first,
        last,
        _iso(parse_id(first)[0]),
        _iso(parse_id(last)[0]),
        len(entries),
        hashlib.sha256(body).hexdigest(),
    )
    head = orjson.dumps({"manifest": asdict(manifest)}) + b"\n"
    z = zstandard.ZstdCompressor(level=LEVEL)
    # two frames: the manifest alone first, so a reader gets it from the segment's first
    # bytes (a ranged GET); ``zstdcat`` reads both as one stream of lines
    return manifest, z.compress(head) + z.compress(body)


def read(data: bytes) -> tuple[Manifest, list[Entry]]:
    """Decode a segment and check it against its manifest (count and sha256)."""
    try:
        first = zstandard.ZstdDecompressor().decompressobj()
        head = first.decompress(data)
        body = zstandard.ZstdDecompressor().decompress(first.unused_data) if first.unused_data else b""
    except zstandard.ZstdError as exc:
        raise SegmentError(f"not a zstandard segment: {exc}") from None
    manifest = manifest_of(head.rstrip(b"\n"))
    if hashlib.sha256(body).hexdigest() != manifest.sha256:
        raise SegmentError(f"checksum mismatch in segment {manifest.partition}-{manifest.first_id}")
    entries = [_entry(ln) for ln in _lines(body)]
    if len(entries) != manifest.count:
        raise SegmentError(f"{len(entries)} lines, the manifest says {manifest.count}")
    return manifest, entries


def manifest_of(head: bytes) -> Manifest:
    """The manifest from a segment's first line (or its first bytes, compressed: ``head``
    decompresses the first frame)."""
    if head[:4] == b"\x28\xb5\x2f\xfd":  # a zstandard frame
        head = zstandard.ZstdDecompressor().decompressobj().decompress(head).rstrip(b"\n")
    try:
        return Manifest(**orjson.loads(head)["manifest"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise SegmentError(f"no manifest line: {exc}") from None


def _lines(body: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(body):
        end = body.index(b"\n", start)
        yield body[start:end]
        start = end + 1
