"""The wire contract: envelopes, event ids, stream keys."""

from __future__ import annotations

import copy
import os
import pickle
import time
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from ingest.contract import wire
from ingest.contract.events import Dialect, Envelope, EventType, unique_token, uuid7
from ingest.contract.keys import Keys
from ingest.contract.wire import FIELD, FIELDS, PACKED, EnvelopeError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(
    type_=st.sampled_from(EventType),
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    ip=st.none() | st.ip_addresses().map(str),
    ua=st.none() | st.text(max_size=200),
    ws=st.none() | st.uuids().map(str),
)
def test_envelope_round_trip(type_, payload, ip, ua, ws):
    e = Envelope(type=type_, dialect="biore", payload=payload, workspace_id=ws, ip=ip, user_agent=ua)
    assert wire.from_blob(wire.to_blob(e)) == e


def test_envelope_is_compact():
    e = Envelope(
        type=EventType.CLICK,
        dialect="biore",
        payload={"code": "alice123"},
        ip="203.0.113.7",
        user_agent="Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15",
    )
    assert len(wire.to_blob(e)) < 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{}",
        b"[]",
        b"[2]",
        b'[1,"zz",1,null,0,null,null,"d",{}]',
        b'[1,"' + b"0" * 32 + b'",9,null,0,null,null,"d",{}]',
        b'[1,"' + b"0" * 32 + b'",1,null,"soon",null,null,"d",{}]',
        b'[1,"' + b"0" * 32 + b'",1,null,0,null,null,"d",[]]',
        b'[1,123,1,null,0,null,null,"d",{}]',
        b'[1,"' + b"0" * 32 + b'",1,null,true,null,null,"d",{}]',
        b'[1,"' + b"0" * 32 + b'",1,7,0,null,null,"d",{}]',
    ],
)
def test_undecodable_entries_raise_envelope_error(raw):
    with pytest.raises(EnvelopeError):
        wire.from_blob(raw)


def test_uuid7_layout_and_order():
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    for u in ids:
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= u.int >> 80 <= after
    assert uuid7(ms=1000) < uuid7(ms=1001)


def test_unique_tokens_span_pages_and_forks():
    tokens = [unique_token() for _ in range(10_000)]  # ~40 pages of pooled urandom
    assert len(set(tokens)) == 10_000 and all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)
    # a forked child must not replay the rest of its parent's page
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, unique_token().encode())
        os._exit(0)
    os.close(w)
    mine = unique_token()
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != mine


def test_stream_keys_are_hash_tagged_per_partition():
    keys = Keys("refstream", 4)
    assert keys.streams == tuple(f"refstream:events:{{{p}}}" for p in range(4))
    assert len({key_slot(s.encode()) for s in keys.streams}) == 4  # spread over the cluster
    assert keys.partition_for("alice") == keys.partition_for("alice")
    assert {keys.partition_for(f"code{i}") for i in range(200)} == {0, 1, 2, 3}


UA_PARTS = [
    "Mozilla/5.0 (",
    ") AppleWebKit/537.36 (KHTML, like Gecko) Chrome/",
    "124",
    ".0.0.0",
    " Safari/537.36",
    "Mozilla/5.0",
    "\x01",
    "\x00",
    "é",
    " ",
    ";",
]


PAYLOAD_KEYS = ["code", "c", "~", "~c", "~~", "", "visitor_id", "v", "referrer", "metadata", "Code"]


def _as_redis_returns(fields: dict[bytes, bytes | int]) -> dict[bytes, bytes]:
    return {k: str(v).encode() if isinstance(v, int) else v for k, v in fields.items()}


@given(
    type_=st.sampled_from(EventType),
    dialect=st.sampled_from(["biore", "native", "redirect", "1", ""]) | st.text(max_size=8),
    payload=st.dictionaries(st.sampled_from(PAYLOAD_KEYS) | st.text(max_size=10), json_values, max_size=6),
    ip=st.none() | st.ip_addresses().map(str) | st.text(max_size=4),
    ua=st.none() | st.text(max_size=200) | st.lists(st.sampled_from(UA_PARTS)).map("".join),
    ws=st.none() | st.uuids().map(str) | st.text(max_size=17),
)
def test_entry_round_trip(type_, dialect, payload, ip, ua, ws):
    """Version 3, every field: None apart from "", text with NULs or of any length (a
    workspace id that is no UUID), unicode; and version 1 read through the same door."""
    e = Envelope(type=type_, dialect=dialect, payload=payload, workspace_id=ws, ip=ip, user_agent=ua)
    assert wire.from_entry(_as_redis_returns(wire.to_entry_dict(e))) == e
    assert wire.from_entry(wire.to_entry_dict(e)) == e  # type: ignore[arg-type]  # integers as given
    assert wire.from_entry({FIELD: wire.to_blob(e)}) == e


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(EventType.CLICK, Dialect.BIORE, {"code": "ü\x00"}, str(uuid.uuid4()), "203.0.113.7", "Mozilla/5.0"),
        Envelope(EventType.LEAD, "", {}, None, None, None, received_at_ms=0),
        Envelope(EventType.CONVERSION, "4", {"n": None}, "", "", "\x00", received_at_ms=2**62),
        Envelope(
            EventType.CLICK, Dialect.NATIVE, {"a": [1, 2.5]}, "x" * 15, "\x00", "日本語 ua", event_id=uuid.UUID(int=0)
        ),
    ],
)
async def test_entry_round_trip_through_redis(redis, keys: Keys, envelope: Envelope):
    """What Redis gives back decodes to the same envelope; the entry is always the one field
    of the same name, so every entry shares its listpack node's master fields."""
    assert wire.to_entry(envelope)[::2] == (PACKED,)
    sid = await redis.xadd(keys.stream(0), wire.to_entry_dict(envelope))
    [(got_id, fields)] = await redis.xrange(keys.stream(0))
    assert got_id == sid and list(fields) == [PACKED]
    assert wire.from_entry(fields) == envelope


CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)


def test_entry_layout():
    """The header's integers in fixed places, the 16-byte id, our dialects as codes, a
    browser's User-Agent as its version numbers between one-byte fragments, our payload keys
    as one letter: the layout the bench's bytes per event depend on."""
    ws = str(uuid.uuid4())
    e = Envelope(EventType.LEAD, Dialect.REFPORT, {"code": "a"}, ws, "203.0.113.7", CHROME, received_at_ms=2**40 + 7)
    ua = b"\x01\x05\x02124\x15\x04"
    head = b"\x03" + e.event_id.bytes + b"\x00\x02" + (2**40 + 7).to_bytes(8) + b"\x05"
    lengths = b"\x00\x10" + b"\x00\x0b" + len(ua).to_bytes(4) + b"\x00\x00"
    assert wire.to_entry(e) == (PACKED, head + lengths + uuid.UUID(ws).bytes + b"203.0.113.7" + ua + b'{"c":"a"}')
    odd = Envelope(EventType.CLICK, "carrier-pigeon", {}, None, None, None, received_at_ms=-1)
    (_, packed) = wire.to_entry(odd)
    assert packed[17:28] == b"\x00\x01" + b"\xff" * 8 + b"\x00"  # code 0: the dialect's text follows
    assert packed[28:] == b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0ecarrier-pigeon{}"
    bot = "Mozilla/5.0 (compatible; Googlebot/2.1)\t"  # a control byte: verbatim, behind a NUL
    assert (
        b"\x00" + bot.encode() + b"{}" in wire.to_entry(Envelope(EventType.CLICK, Dialect.BIORE, {}, user_agent=bot))[1]
    )
    other = Envelope(EventType.CLICK, Dialect.BIORE, {"c": 1, "~x": 2, "extra": 3, "referrer": 4})
    assert wire.to_entry(other)[1].endswith(b'{"~c":1,"~~x":2,"extra":3,"r":4}')  # a key of ours, or escaped


def test_what_no_entry_can_hold_is_an_envelope_error_and_a_spooled_one_goes_as_it_was():
    """Past the header's bounds (an address of 65,536 bytes, a type past two bytes): an
    ``EnvelopeError``, never a ``struct.error``; a spooled blob holding one is appended as
    the blob it is, for the worker to dead-letter."""
    long_ip = Envelope(EventType.CLICK, Dialect.BIORE, {}, None, "1" * 65_536, None)
    with pytest.raises(EnvelopeError):
        wire.to_entry(long_ip)
    assert wire.entry_from_blob(wire.to_blob(long_ip)) == {FIELD: wire.to_blob(long_ip)}
    with pytest.raises(EnvelopeError):
        wire.to_entry(Envelope(EventType.CLICK, Dialect.BIORE, {}, received_at_ms=2**63))
    assert (
        wire.from_entry(dict([wire.to_entry(Envelope(EventType.CLICK, "", {}, None, "1" * 65_535))])).ip == "1" * 65_535
    )


def test_a_version_2_entry_still_reads():
    """Entries the edge wrote before version 3 (in streams, archives, dead letters): eight
    fields, integers as Redis returns them."""
    ws, eid = uuid.uuid4(), uuid7()
    fields = {
        b"i": eid.bytes,
        b"t": b"2",
        b"w": ws.bytes,
        b"r": b"1790000000123",
        b"a": b"203.0.113.7",
        b"u": b"\x01\x05\x02124\x15\x04",
        b"d": b"5",
        b"p": b'{"c":"a","~x":1,"extra":2}',
    }
    assert wire.from_entry(fields) == Envelope(
        EventType.LEAD,
        Dialect.REFPORT,
        {"code": "a", "x": 1, "extra": 2},
        str(ws),
        "203.0.113.7",
        CHROME,
        received_at_ms=1790000000123,
        event_id=eid,
    )
    assert wire.entry_of({**fields, b"other": b"1"}) == fields


def _packed(e: Envelope, cut: int = 0, **head: int) -> dict[bytes, bytes]:
    """``e``'s version-3 field with header values replaced, or its end cut off."""
    v = bytearray(wire.to_entry(e)[1])
    for name, value in head.items():
        at, size = {"version": (0, 1), "type": (17, 2), "code": (27, 1), "ua_len": (32, 4)}[name]
        v[at : at + size] = value.to_bytes(size)
    return {PACKED: bytes(v[: len(v) - cut])}


_E = Envelope(EventType.CLICK, Dialect.BIORE, {"code": "x"}, str(uuid.uuid4()), "203.0.113.7", CHROME)


@pytest.mark.parametrize(
    "fields",
    [
        {PACKED: b""},
        {PACKED: b"\x03" * 20},  # shorter than the header
        _packed(_E, version=2),
        _packed(_E, version=4),
        _packed(_E, type=99),
        _packed(_E, code=200),  # no dialect of ours
        _packed(_E, ua_len=10_000),  # longer than the entry
        _packed(_E, cut=1),  # the payload cut short
        _packed(_E, cut=len(b'{"c":"x"}')),  # no payload
    ],
)
def test_undecodable_version_3_entries_raise_envelope_error(fields):
    with pytest.raises(EnvelopeError):
        wire.from_entry(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"event": b"click"},
        {b"i": b"\x01" * 16, b"t": b"1"},  # incomplete
        {**dict.fromkeys(FIELDS, b""), b"i": b"short"},
        # an id of 15 and of 17 bytes, all else valid
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 15, b"t": b"1", b"r": b"0", b"d": b"1", b"p": b"{}"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 17, b"t": b"1", b"r": b"0", b"d": b"1", b"p": b"{}"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"9", b"r": b"0", b"d": b"1", b"p": b"{}"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"1", b"r": b"soon", b"d": b"1", b"p": b"{}"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"1", b"r": b"0", b"d": b"1", b"p": b"[]"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"1", b"r": b"0", b"d": b"1", b"p": b"{"},
        {
            **dict.fromkeys(FIELDS, b""),
            b"i": b"\x01" * 16,
            b"t": b"1",
            b"r": b"0",
            b"d": b"1",
            b"p": b"{}",
            b"w": b"\x05short",
        },
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"1", b"r": b"0", b"d": b"\xff", b"p": b"{}"},
        {**dict.fromkeys(FIELDS, b""), b"i": b"\x01" * 16, b"t": b"1", b"r": b"0", b"d": b"", b"p": b"{}"},
        {FIELD: b"[1]"},
    ],
)
def test_undecodable_version_2_entries_raise_envelope_error(fields):
    with pytest.raises(EnvelopeError):
        wire.from_entry(fields)


@given(st.binary(min_size=16, max_size=16))
def test_an_event_id_read_from_an_entry_is_a_uuid_like_any_other(raw):
    """``from_entry`` makes its ids without ``UUID.__init__`` (``wire._uuid``): each is the
    same value in every way a reader can look at it."""
    made, expected = wire._uuid(raw), uuid.UUID(bytes=raw)
    assert type(made) is uuid.UUID
    assert made == expected and hash(made) == hash(expected) and not made != expected
    assert (str(made), made.bytes, made.int, made.version, made.is_safe) == (
        str(expected),
        expected.bytes,
        expected.int,
        expected.version,
        expected.is_safe,
    )
    assert pickle.loads(pickle.dumps(made)) == expected and copy.deepcopy(made) == expected
    assert orjson.dumps(made) == orjson.dumps(expected)
    with pytest.raises(TypeError):
        made.int = 0  # type: ignore[misc]  # immutable, as UUID is
