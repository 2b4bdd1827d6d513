"""The bounds of client JSON, stated once: what one door accepts every later step can hold.

A client's document (a request body, a batch's item, an import's row) nests at most
``MAX_DEPTH`` levels and holds at most ``MAX_VALUES`` values in all; a free-form object in
it (``metadata``) at most ``MAX_KEYS`` keys at its top; the body itself is capped in bytes
by the settings (``REFSTREAM_MAX_BODY_BYTES``, ``REFSTREAM_BATCH_MAX_BYTES``). Every door
calls ``check`` on what it parsed (``ingest.edge.body.json_object`` for the routes, the
batch route per item, the import per row) and refuses what it raises with a 400 in its own
shape, or the row's line; the worker calls it again on each entry it decodes
(``workers.consumer.pipeline``), so an entry written by an older edge, an import or a
replay of the archive is dead-lettered, never stored half-way.

Why a depth at all: orjson parses 1024 levels but writes only 255 (``orjson.dumps`` raises
``TypeError('Recursion limit reached')``), and every later step writes the document again,
each at its own depth: the stream entry (the payload: the document's own depth), the
spool's version-1 blob (+1), an idempotency key's fingerprint (+2), the worker's rows to
Postgres (``jsonrows.doc``: +2), a webhook's outbox row (the event inside its payload
inside a row: +4), fraud evidence (+3). ``MAX_DEPTH`` leaves more than 200 levels for
them; a depth past 32 is no one's tracking metadata. Counted in levels of containers: ``{}``
and ``{"a": 1}`` are 1, ``{"metadata": {"plan": "pro"}}`` is 2.
"""

from __future__ import annotations

from typing import Any

from ingest.contract.errors import Refused

MAX_DEPTH = 32  # levels of objects and arrays in one document, the document itself the first
MAX_VALUES = 10_000  # members of every object and array in one document, at every level, together
MAX_KEYS = 100  # keys at the top of a free-form object (``metadata``)


class BoundsError(Refused, ValueError):
    """A document past a bound: the door's 400 (its message says which bound), the worker's dead letter."""


def check(doc: Any, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Raise ``BoundsError`` when ``doc`` (as ``orjson.loads`` returns it) nests deeper than
    ``max_depth`` levels or holds more than ``max_values`` values.

    A level at a time, without recursion (a document as deep as orjson parses must not
    meet Python's recursion limit either), and only containers are walked: a flat body of
    ten fields costs one ``len`` and one scan of its values, about a microsecond."""
    level = [doc] if type(doc) is dict or type(doc) is list else []
    depth = values = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise BoundsError(f"JSON nested deeper than {max_depth} levels")
        below: list[Any] = []
        for c in level:
            values += len(c)
            for v in c.values() if type(c) is dict else c:
                if type(v) is dict or type(v) is list:  # what orjson.loads makes: no subclasses
                    below.append(v)
        if values > max_values:
            raise BoundsError(f"JSON holding more than {max_values} values")
        level = below


def within(doc: Any) -> bool:
    """``check`` as a test: True when ``doc`` keeps to the bounds."""
    try:
        check(doc)
    except BoundsError:
        return False
    return True
