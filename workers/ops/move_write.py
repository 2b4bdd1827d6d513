"""A table's staged rows (``_moving``, a temporary table on the target's connection)
written over the target's copy of a moving workspace (``workers.ops.move``).

The rows the target holds already are updated first, then the new ones inserted, all of
the table's at once: a unique value other than the key (a customer's visitor) that passed
from one row to another since the last copy is let go by the old row before the new one
takes it (an insert first, or in an earlier chunk, met the old row still holding it, and
every run of the move failed on it: the generative test's seed 1848841839,
``customers_visitor``). Where it passed between two rows the target holds, one UPDATE may
meet the taker before the giver; the rows are then updated one at a time, each met
conflict left for a later round, until a round updates none (a cycle of values, which no
order resolves: ``MoveError``, naming the table).
"""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg


class _Table(Protocol):
    name: str
    columns: list[str]
    key: list[str]
    fixed: frozenset[str]


async def write(conn: asyncpg.Connection, t: _Table, error: type[Exception]) -> None:
    """``_moving``'s rows into ``t`` on ``conn`` (in its transaction), over those of the
    same key; ``error`` raised for a cycle of unique values."""
    cols = ", ".join(f'"{c}"' for c in t.columns)
    if not t.key:
        await conn.execute(
            f'INSERT INTO "{t.name}" ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM _moving ON CONFLICT DO NOTHING'
        )
        return
    await conn.execute("ANALYZE _moving")  # its size, for the joins' plans below
    keys = ", ".join(f'"{c}"' for c in t.key)
    same = " AND ".join(f'x."{c}" = m."{c}"' for c in t.key)
    rest = [c for c in t.columns if c not in t.key and c not in t.fixed]
    if rest:
        sets = ", ".join(f'"{c}" = m."{c}"' for c in rest)
        update = f'UPDATE "{t.name}" x SET {sets} FROM _moving m WHERE {same}'
        try:
            async with conn.transaction():  # a savepoint: the row by row below starts clean
                await conn.execute(update)
        except asyncpg.UniqueViolationError:
            await _row_by_row(conn, t, update, same, error)
    sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in rest) or f'"{t.key[0]}" = EXCLUDED."{t.key[0]}"'
    await conn.execute(
        f'INSERT INTO "{t.name}" ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM _moving m'
        f' WHERE NOT EXISTS (SELECT 1 FROM "{t.name}" x WHERE {same})'
        f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
    )


async def _row_by_row(conn: asyncpg.Connection, t: _Table, update: str, same: str, error: type[Exception]) -> None:
    keys = ", ".join(f'm."{c}"' for c in t.key)
    one = " AND ".join(f'm."{c}" = ${i + 1}' for i, c in enumerate(t.key))
    held = f'SELECT {keys} FROM _moving m WHERE EXISTS (SELECT 1 FROM "{t.name}" x WHERE {same})'
    left: list[Any] = [tuple(r) for r in await conn.fetch(held)]
    while left:
        blocked: list[Any] = []
        for key in left:
            try:
                async with conn.transaction():
                    await conn.execute(f"{update} AND {one}", *key)
            except asyncpg.UniqueViolationError:
                blocked.append(key)
        if len(blocked) == len(left):
            raise error(f"{t.name}: {len(blocked)} rows hold each other's unique values; move again once they change")
        left = blocked
