"""The wire contract: envelopes, event ids, stream keys."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from ingest.events import Envelope, EnvelopeError, EventType, unique_token, uuid7
from ingest.keys import Keys

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
    assert Envelope.decode(e.encode()) == e


def test_envelope_is_compact():
    e = Envelope(
        type=EventType.CLICK,
        dialect="biore",
        payload={"code": "alice123"},
        ip="203.0.113.7",
        user_agent="Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15",
    )
    assert len(e.encode()) < 200


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
        Envelope.decode(raw)


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
