"""The store port: what the domain asks of the database that holds its sessions.

Every method is one operation, durably committed before it returns, and
applied in the order the calls were made. ``sqlite.Store`` and
``postgres.Store`` implement it with the same guarantees, and pass one store
test suite (tests/test_store_contract.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from service.domain.contract import Status
from service.domain.states import Session
from service.faults import FaultPoints
from service.store.messages import Message


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release."""


class StaleRevision(RuntimeError):
    """An update expected a revision that is no longer the stored one."""


class Store(Protocol):
    #: Fault points (tests): a commit can be made to fail, as with a full disk.
    faults: FaultPoints

    async def load_sessions(self) -> list[Session]:
        """Every stored session."""

    async def insert_session(self, session: Session) -> int:
        """Store a new session; returns its id."""

    async def update_session(self, session: Session) -> None:
        """Store the next revision of a session; the stored one must be revision - 1."""

    async def delete_session(self, session_id: int) -> None:
        """Delete a session and its messages."""

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message (the intent to send it)."""

    async def finish_message(self, message: Message, finished_at: datetime) -> None:
        """Record the outcome of a message."""

    async def find_message(self, session_id: int, idempotency_key: str) -> Message | None:
        """The message a session recorded under an idempotency key."""

    async def mark_pending_unknown(self, code: str, message: str, at: datetime) -> int:
        """Mark messages whose outcome was never recorded as unknown; returns how many."""

    async def close(self) -> None:
        """Finish every queued operation and close."""
