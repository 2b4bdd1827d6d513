"""One plan for a statement run at every batch, whatever its array parameter holds.

Postgres's plan cache makes a custom plan (for the values bound) at each of a prepared
statement's first five executions, then compares their average cost with its generic plan
(for any values) and keeps whichever is cheaper. ``col = ANY($1::text[])`` is estimated
from the array's length: when the first batches name a link or two (a trickle, a worker
just started), the custom plans cost less, and from then on every execution is planned
anew. For a join over links, workspaces, programs and affiliates that planning cost
several times the execution (a batch's links read: ~1.5 ms of Postgres's CPU against ~0.2),
and it never stops, whatever later batches hold.

``any_of`` hides the array behind a scalar subquery: the planner sees an initplan's value,
not the array, so the custom plans are estimated as the generic one is, and the generic
plan is kept from the sixth execution on. It runs as before: an index scan over
``= ANY(array)`` (``tests/test_pool_connections.py`` reads ``pg_prepared_statements``).
"""

from __future__ import annotations


def any_of(param: int, sql_type: str) -> str:
    """``ANY((SELECT $param::type[])::type[])``: for ``col = any_of(1, "uuid")``."""
    return f"ANY((SELECT ${param}::{sql_type}[])::{sql_type}[])"
