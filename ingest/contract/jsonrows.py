"""A batch's rows to Postgres as one jsonb document, taken apart in SQL.

asyncpg encodes an array parameter element by element, and first checks every element
against ``collections.abc`` types (to find nested arrays): for the 25 columns of a
500-event batch that was about a quarter of the worker's CPU, and as much of the ceiling's.
Passed as one JSON array of rows instead, orjson encodes the batch in one C call and
Postgres casts each field to its column's type: per event, ~15 µs of Python became ~3 µs,
with Postgres's own share unchanged (measured on the events insert; ``json`` rather than
``jsonb`` would cost Postgres five times more, since it re-parses a row for every field
taken out of it).

A row is a tuple or list of fields, each a JSON value: str, int, float, bool, None, a
UUID, datetime or date, or (for a jsonb column) a dict or list. ``->>`` gives a field's
text, cast to the column's type, SQL NULL for a JSON null; a jsonb column takes the field
as it is, a JSON null as SQL NULL. Datetimes must be aware (they are: ``stored.ts`` and
what asyncpg returns), or Postgres would read them in the session's time zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


def doc(rows: Sequence[Sequence[Any]]) -> str:
    """The parameter: ``rows`` (a list of tuples) as one JSON text (a ``text`` parameter, cast to jsonb in SQL,
    so the pool's jsonb codec is not involved). Anything orjson does not know natively
    (asyncpg's own UUID type, as queries return it) is written as its ``str``.

    A client's document in a row (a sale's ``metadata``) is two levels down: it keeps to
    ``ingest.contract.bounds`` (checked by every door, and by the worker on each entry it
    decodes), so the whole is at most ``MAX_DEPTH`` + 2 levels, and orjson writes 255."""
    return orjson.dumps(rows, default=str).decode()


def select(types: Sequence[str], *, param: int = 1) -> str:
    """``SELECT <field 0 as types[0]>, ... FROM jsonb_array_elements($param::text::jsonb) AS r``:
    a query whose columns, in order, are each row's fields cast to ``types``."""
    fields = ", ".join(
        f"NULLIF(r->{i}, 'null'::jsonb)" if t == "jsonb" else f"(r->>{i})::{t}" for i, t in enumerate(types)
    )
    return f"SELECT {fields} FROM jsonb_array_elements(${param}::text::jsonb) AS r"


def table(types: Sequence[str], names: str, *, param: int = 1) -> str:
    """``(select(...)) AS names``: the rows as a FROM item, ``names`` like ``d(id, clicks)``."""
    return f"({select(types, param=param)}) AS {names}"
