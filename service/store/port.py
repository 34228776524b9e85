"""The store port: what the domain asks of the database that holds its sessions.

Every method is one operation, durably committed before it returns, and
applied in the order the calls were made. ``service.store.sql.SqlStore``
implements it once for SQLite and PostgreSQL, which pass one store test suite
(tests/test_store_contract.py). A write that fails for the storage's sake
raises the driver's error or ``failures.DatabaseUnreachable`` (nothing was
stored), or ``failures.CommitUnknown`` (a commit whose answer was lost could
not be settled in time: it may have landed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from service.domain.contract import Status
from service.domain.states import Session, SessionRef
from service.faults import FaultPoints
from service.store.messages import Message


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release."""


class StaleRevision(RuntimeError):
    """An update expected a revision that is no longer the stored one."""


class LeaseLost(RuntimeError):
    """A write for a session this node no longer owns was refused (fencing; several nodes only).

    Nothing was written: another node took the session over, or this node's
    lease ran out before the write reached the database.
    """

    def __init__(self, instance_id: str, why: str = "its lease is held by another node") -> None:
        super().__init__(f"this node no longer owns session {instance_id!r}: {why}")
        self.instance_id = instance_id


class Store(Protocol):
    #: Fault points (tests): a commit can be made to fail, as with a full disk.
    faults: FaultPoints

    async def load_sessions(self) -> list[Session]:
        """Every stored session."""

    async def get_session(self, instance_id: str) -> Session | None:
        """The stored session ``instance_id``, if it exists."""

    async def insert_session(self, session: Session) -> int:
        """Store a new session; returns its id."""

    async def update_session(self, session: Session) -> None:
        """Store the next revision of a session; the stored one must be revision - 1."""

    async def delete_session(self, session: SessionRef) -> None:
        """Delete a session and its messages."""

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message (the intent to send it)."""

    async def finish_message(self, message: Message, finished_at: datetime) -> bool:
        """Record the outcome of a message still pending or unknown; whether it did.

        Forward only, by message id, whoever owns the session now.
        """

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        """The message a session recorded under an idempotency key."""

    async def mark_pending_unknown(
        self, code: str, message: str, at: datetime, session: SessionRef | None = None
    ) -> int:
        """Mark messages whose outcome was never recorded as unknown; returns how many.

        Every session's at start-up, or only ``session``'s (a node taking it over).
        """

    def commits_failing(self) -> bool:
        """Whether the last transaction failed for the storage's sake."""

    async def probe(self) -> None:
        """Commit a transaction that changes no session: raises if commits still fail."""

    async def close(self) -> None:
        """Finish every queued operation and close."""
