"""A link's events as ``events_link_key_received`` (schema 26) finds them.

The index is on (``uuid_hash_extended(link_id, 0)``, ``received_at``): a link's 8-byte key,
then the time. Its pages fill where those of (``link_id``, ``received_at``) stayed half
empty (schema.sql, schema 26). A read by link names the links twice: by their keys, which
the index's condition reads, and by their ids, which the row is checked against (two links
may share a key). Where the index is still being built online (``ingest.manage.online``),
the ids alone pick ``events_link_received``, which stays until the new one is valid.
"""

from __future__ import annotations


def of_links(column: str, param: str) -> str:
    """``column`` (``e.link_id``) is one of the ``uuid[]`` parameter ``param``'s links."""
    keys = f"ARRAY(SELECT uuid_hash_extended(k, 0) FROM unnest({param}::uuid[]) AS k)"
    return f"uuid_hash_extended({column}, 0) = ANY({keys}) AND {column} = ANY({param}::uuid[])"


def of_link(column: str, param: str) -> str:
    """``column`` is the link whose id is the ``uuid`` parameter ``param``."""
    return f"uuid_hash_extended({column}, 0) = uuid_hash_extended({param}::uuid, 0) AND {column} = {param}::uuid"
