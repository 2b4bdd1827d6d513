"""The erasure ledger's digests (``ingest.contract.erasure.digest``), taken from a copy of a
keyed BLAKE2b state made once a key: each must be the keyed BLAKE2b of its text, as the
ledger's entries made before hold, whatever the keys a process meets and in what order."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from ingest.contract import erasure

KINDS = st.sampled_from([erasure.EVENT, erasure.EXTERNAL, erasure.VISITOR, "a"])  # "a": an affiliate's


def by_definition(key: bytes, kind: str, value: str, workspace_id: str | None) -> bytes:
    scope = (workspace_id or "") if kind == erasure.EXTERNAL else ""
    return hashlib.blake2b(f"{kind}\x1f{scope}\x1f{value}".encode(), key=key, digest_size=16).digest()


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=1, max_size=64),
            KINDS,
            st.text(max_size=80),
            st.none() | st.text(max_size=40),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_a_digest_is_the_keyed_blake2b_of_its_text_whatever_keys_came_before(cases) -> None:
    # keys interleaved, more of them than the cache keeps: a state copied from another
    # key's, or one kept past a clear, would answer another digest
    for key, kind, value, workspace in cases:
        assert erasure.digest(key, kind, value, workspace) == by_definition(key, kind, value, workspace)


def test_one_value_digests_alike_twice_and_apart_under_another_key() -> None:
    first = erasure.digest(b"k1", erasure.VISITOR, "v-1")
    assert erasure.digest(b"k1", erasure.VISITOR, "v-1") == first  # the copy left the kept state as it was
    assert erasure.digest(b"k2", erasure.VISITOR, "v-1") != first
