"""The string checks at the request models refuse exactly the characters they name: each
against a per-character definition, over strings mixing every kind of character
(controls, surrogates, non-ASCII, plain text)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from ingest.contract.fields import check_ident, check_no_nul, check_text
from ingest.edge.accept import header
from ingest.edge.body import plain

pytestmark = pytest.mark.once


def _surrogate(c: str) -> bool:
    return 0xD800 <= ord(c) <= 0xDFFF


def _control(c: str) -> bool:
    return ord(c) < 0x20 or c == "\x7f"


REFUSES: dict[Callable[[str], str], Callable[[str], bool]] = {
    check_no_nul: lambda c: c == "\x00" or _surrogate(c),
    check_text: lambda c: (_control(c) and c not in "\t\n\r") or _surrogate(c),
    check_ident: lambda c: _control(c) or _surrogate(c),
}

_EDGES = "\x00\x01\x08\t\n\x0b\x0c\r\x0e\x1f \x7f\x80~é€\ud7ff\ud800\udbff\udc00\udfff\ue000\U0001f600-\\"
# joined from a list: st.text() would leave the surrogates out
strings = st.lists(st.sampled_from(_EDGES) | st.characters(exclude_categories=()), max_size=40).map("".join)


@pytest.mark.parametrize("check", list(REFUSES), ids=lambda f: f.__name__)
@given(value=strings)
def test_a_check_refuses_a_string_exactly_when_a_character_of_it_is_refused(check, value: str) -> None:
    refused = any(REFUSES[check](c) for c in value)
    if refused:
        with pytest.raises(ValueError):
            check(value)
    else:
        assert check(value) is value


@pytest.mark.parametrize("check", list(REFUSES), ids=lambda f: f.__name__)
def test_each_character_alone(check) -> None:
    for c in _EDGES:
        try:
            check(c)
        except ValueError:
            assert REFUSES[check](c), repr(c)
        else:
            assert not REFUSES[check](c), repr(c)


@given(value=strings, limit=st.integers(1, 50))
def test_a_path_segment_is_plain_exactly_when_short_printable_and_without_a_surrogate(value: str, limit: int) -> None:
    # per character, as the check is documented; ``plain`` itself leans on str.isprintable
    expected = 0 < len(value) <= limit and not any(_surrogate(c) or not c.isprintable() for c in value)
    assert plain(value, limit) is expected


@given(value=strings, limit=st.integers(1, 50))
def test_a_header_is_stored_as_its_utf8_with_a_replacement_for_each_bad_byte_and_no_nul(value: str, limit: int) -> None:
    # aiohttp hands a header's bytes that are not UTF-8 over as lone surrogates (surrogateescape)
    raw = value.encode("utf-8", "surrogatepass")
    sent = raw.decode("utf-8", "surrogateescape")
    request = SimpleNamespace(headers=CIMultiDict({"X-Test": sent}))  # all ``header`` reads of a request
    expected = raw.decode("utf-8", "replace").replace("\x00", "")[:limit] or None
    assert header(request, "X-Test", limit) == expected  # type: ignore[arg-type]
