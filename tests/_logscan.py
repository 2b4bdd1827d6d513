"""Reading what refstream's processes logged, for the tests that hold what no log line may
say (docs/privacy.md "Logs") and what no run may show (a crash).

- ``find_personal(log_text, values)``: each line that holds one of ``values`` (a customer
  id, an email, an IP address, a name, a metadata value) in any spelling a log line could
  carry it: as is, JSON-escaped (``\\u00a0``, ``\\t``), as Python's repr escapes it,
  percent-encoded as a path or a query carries it, and case-folded (an email's case).
- ``find_crashes(log_text)``: each line that shows a crash or a bug: ``consumer.crashed``,
  ``request.failed`` (an answered 500), a Python traceback, ``internal_error``.

Both return lines (with what they found first), so an assertion shows what to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MIN_LENGTH = 6  # shorter values match by chance: give each test value something distinctive

_CRASH = re.compile(r"consumer\.crashed|request\.failed|Traceback \(most recent call last\)|internal_error")


def spellings(value: str) -> set[str]:
    """``value`` as a log line might carry it."""
    forms = {
        value,
        json.dumps(value)[1:-1],  # ASCII-escaped JSON
        json.dumps(value, ensure_ascii=False)[1:-1],  # orjson's: UTF-8, control characters escaped
        repr(value)[1:-1],
        quote(value, safe="/"),  # a path
        quote(value, safe=""),
        quote_plus(value),  # a query
    }
    stripped = value.strip()  # a normalized id: what the doors keep of it
    if len(stripped) >= MIN_LENGTH:
        forms.add(stripped)
    return {f for f in forms if f}


def find_personal(log_text: str, values: Iterable[str]) -> list[str]:
    """The lines of ``log_text`` that hold one of ``values``, each as ``value: line``."""
    needles: list[tuple[str, str]] = []
    for value in values:
        if len(value.strip()) < MIN_LENGTH:
            raise ValueError(f"{value!r} is too short to search logs for without false matches")
        needles += [(value, form.casefold()) for form in spellings(value)]
    found = []
    for line in log_text.splitlines():
        folded = line.casefold()
        for value, needle in needles:
            if needle in folded:
                found.append(f"{value!r}: {line[:2000]}")
                break
    return found


def find_crashes(log_text: str) -> list[str]:
    """The lines of ``log_text`` that show a crash: the consumer's, an answered 500, a traceback."""
    return [line[:2000] for line in log_text.splitlines() if _CRASH.search(line)]
