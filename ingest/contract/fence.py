"""A workspace's move fence as every writer of its rows checks it: the advisory lock a write
holds shared (a move's fence holds it exclusive), the statements that say whether the
workspace has moved away, and ``Moved``, what a write that met the fence raises. Below the
ledger (``ingest.ledger.placement`` routes by them) so that the contract's own writers (what
an erasure learns, and reads) check the same fence."""

from __future__ import annotations

from uuid import UUID

from ingest.contract.errors import Outage


def fence_key(workspace_id: UUID | str) -> str:
    """The advisory lock a write of the workspace's rows holds shared, and a move's fence
    exclusive (``hashtextextended`` of it)."""
    return f"refstream:workspace:{workspace_id}"


# a write of workspaces' rows on a shard of several, in its transaction: their fence locks
# held shared (a move's fence waits for the transaction), then, in a statement of its own
# (a snapshot taken after the locks), whether any of them has moved away (``Moved``)
FENCE_LOCK = (
    "SELECT count(pg_advisory_xact_lock_shared(hashtextextended('refstream:workspace:' || x, 0)))"
    " FROM unnest($1::uuid[]) x"
)
FENCE_MOVED = "SELECT id FROM workspaces WHERE id = ANY($1::uuid[]) AND moved_to IS NOT NULL"
# the same for a writer that holds one shard for as long as it runs (an import, which found
# its workspace there as it started): a workspace the shard does not hold (a moved-away copy
# dropped since, or a move's target) is not here either
FENCE_NOT_HERE = (
    "SELECT x AS id FROM unnest($1::uuid[]) x"
    " WHERE NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.id = x AND w.moved_to IS NULL)"
)


class Moved(Outage):
    """A write met the fence of a workspace that is moving, or has moved, to another shard:
    retried once the directory says where it is (``workers.ops.move``)."""

    def __init__(self, message: str, workspaces: list[str] | None = None) -> None:
        super().__init__(message)
        self.workspaces = workspaces or []
