"""A batch's rows to Postgres as one jsonb document, taken apart in SQL.

asyncpg encodes an array parameter element by element, and first checks every element
against ``collections.abc`` types (to find nested arrays): for the 25 columns of a
500-event batch that was about a quarter of the worker's CPU, and as much of the ceiling's.
Passed as one jsonb array of rows instead, orjson (the pool's jsonb codec) encodes the
batch in one C call and Postgres casts each field to its column's type: per event, ~15 µs
of Python became ~3 µs, with Postgres's own share unchanged (measured on the events
insert; ``json`` rather than ``jsonb`` would cost Postgres five times more, since it
re-parses a row for every field taken out of it).

A row is a tuple or list of fields, each a JSON value: str, int, bool, None, UUID,
datetime, date, or (for a jsonb column) a dict or list. ``->>`` gives a field's text, cast
to the column's type, SQL NULL for a JSON null; a jsonb column takes the field as it is,
a JSON null as SQL NULL.
"""

from __future__ import annotations

from collections.abc import Sequence


def select(types: Sequence[str], *, param: int = 1) -> str:
    """``SELECT <field 0 as types[0]>, ... FROM jsonb_array_elements($param::jsonb) AS r``:
    a query whose columns, in order, are each row's fields cast to ``types``."""
    fields = ", ".join(
        f"NULLIF(r->{i}, 'null'::jsonb)" if t == "jsonb" else f"(r->>{i})::{t}" for i, t in enumerate(types)
    )
    return f"SELECT {fields} FROM jsonb_array_elements(${param}::jsonb) AS r"


def table(types: Sequence[str], names: str, *, param: int = 1) -> str:
    """``(select(...)) AS names``: the rows as a FROM item, ``names`` like ``d(id, clicks)``."""
    return f"({select(types, param=param)}) AS {names}"
