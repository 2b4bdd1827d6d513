"""Whom an erasure names: the external id as every door now stores it
(``ingest.contract.ids``), the id as given, and every spelling of it that a version before
the rule stored as sent ("cust_1\\u00a0", a decomposed "é"): rows written before the rule
keep being found, whichever spelling the erasure is asked for."""

from __future__ import annotations

import asyncpg

from ingest.contract import ids

# an id no normalization changes: printable ASCII, no space at either end; only the others
# are read back and normalized here (few, or none), through the customers_external and
# sales_customer indexes' workspace prefix
_PLAIN = r"^[!-~]([ -~]*[!-~])?$"
_STORED = """
SELECT external_id FROM customers WHERE workspace_id = $1 AND external_id !~ $2
UNION
SELECT customer_external_id FROM sales WHERE workspace_id = $1 AND customer_external_id !~ $2
"""


async def subjects(conn: asyncpg.Connection, workspace_id: str, given: str) -> list[str]:
    """The ids to erase for ``given``, the normalized one first (``ids.InvalidId`` when none can
    name anyone): it, ``given`` where it differs, and the stored spellings that normalize to it."""
    forms = ids.stored_forms(given)
    normal = ids.normalized_or_none(given)
    if normal is not None:
        stored = {r[0] for r in await conn.fetch(_STORED, workspace_id, _PLAIN) if r[0] is not None}
        forms += sorted(s for s in stored if s not in forms and ids.normalized_or_none(s) == normal)
    return forms
