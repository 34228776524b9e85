"""The fence of a node's writes: a session is written only under a lease this node holds.

Every session write and message intent of a node checks, in its own
transaction, that the session's lease row still names this node, at the
epoch it holds, and has not run out (on the database's clock). The row stays
share-locked until the transaction ends, so a take-over waits for the write
to commit, then sees it. A refused write changes nothing and is the
contract's SESSION_MOVING; the node lets the session go at once.
"""

from __future__ import annotations

from typing import Protocol

import asyncpg

from service.domain import errors
from service.store.port import LeaseLost
from service.store.sql import Db


class Leases(Protocol):
    """The leases this node holds (``node.LeaseBook``)."""

    def token(self, instance_id: str) -> tuple[str, int]:
        """The owner and epoch this node holds for the session; LeaseLost if none."""

    def rejected(self, instance_id: str) -> None:
        """The database refused a write: the lease is no longer this node's."""


class LeaseFence:
    """``sql.Fence`` over the node's leases."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases

    async def check(self, db: Db, instance_id: str) -> None:
        try:
            owner, epoch = self._leases.token(instance_id)
        except LeaseLost as lost:
            raise _moving(instance_id, str(lost)) from None
        try:
            held = await db.fetch(
                "SELECT true FROM leases WHERE instance_id = ? AND owner = ? AND epoch = ? "
                "AND lease_until > clock_timestamp() FOR SHARE",
                instance_id,
                owner,
                epoch,
            )
        except asyncpg.LockNotAvailableError:  # lock_timeout: a take-over holds the row
            raise _moving(instance_id, "its lease is being taken over") from None
        if not held:
            self._leases.rejected(instance_id)
            raise _moving(instance_id, f"the database refused epoch {epoch}")


def _moving(instance_id: str, why: str) -> errors.ContractError:
    return errors.session_moving(instance_id, f"has moved to another node ({why})")
