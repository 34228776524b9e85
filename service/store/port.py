"""The store port: what the domain asks of the database that holds its sessions.

Every method is one operation, durably committed before it returns, and
applied in the order the calls were made. Every change to a session and every
move of a message's status appends one event to the event log in the same
transaction; the events of each committed transaction reach the listener
given to ``on_events``, in commit order. ``service.store.sql.SqlStore``
implements it once for SQLite and PostgreSQL, which pass one store test suite
(tests/test_store_contract.py). A write that fails for the storage's sake
raises the driver's error or ``failures.DatabaseUnreachable`` (nothing was
stored), or ``failures.CommitUnknown`` (a commit whose answer was lost could
not be settled in time: it may have landed).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from service.domain.contract import Status
from service.domain.events import Event, EventPage, LogPosition
from service.domain.receipts import MessageReceipt
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

    async def update_session(self, session: Session, previous: Status | None = None) -> None:
        """Store the next revision of a session; the stored one must be revision - 1.

        ``previous`` is the status it had (the log keeps it for streams filtered by status).
        """

    async def delete_session(self, session: SessionRef, at: datetime | None = None) -> None:
        """Delete a session and its messages; the log keeps its last state, deleted at ``at``."""

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message (the intent to send it)."""

    async def finish_message(self, message: Message, finished_at: datetime) -> bool:
        """Record the outcome of a message still pending or unknown; whether it did.

        Forward only, by message id, whoever owns the session now.
        """

    async def apply_receipt(
        self, session: SessionRef, receipt: MessageReceipt, now: datetime
    ) -> list[Message]:
        """Record WhatsApp's receipt for the messages it names; returns those it moved.

        Forward only (``service.domain.receipts``), by WhatsApp's message id.
        """

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        """The message a session recorded under an idempotency key."""

    async def get_message(self, instance_id: str, message_id: str) -> Message | None:
        """The message ``message_id`` of the session ``instance_id``, if it sent one."""

    async def mark_pending_unknown(
        self, code: str, message: str, at: datetime, session: SessionRef | None = None
    ) -> int:
        """Mark messages whose outcome was never recorded as unknown; returns how many.

        Every session's at start-up, or only ``session``'s (a node taking it over).
        """

    def on_events(self, listener: Callable[[list[Event]], None]) -> None:
        """Hand the events of every committed transaction to ``listener``, in commit order."""

    async def log_position(self) -> LogPosition:
        """The event log's latest sequence number and the last one trimmed."""

    async def read_events(self, after: int, limit: int) -> EventPage:
        """Up to ``limit`` events after the sequence number ``after``, in commit order."""

    async def current_state(
        self, status: Status | None, instance_id_prefix: str
    ) -> tuple[list[Session], int]:
        """The sessions that match, read in one snapshot with the log's latest sequence number."""

    async def trim_events(self, before: datetime, batch: int) -> int:
        """Remove up to ``batch`` of the oldest events older than ``before``; returns how many."""

    def commits_failing(self) -> bool:
        """Whether the last transaction failed for the storage's sake."""

    async def probe(self) -> None:
        """Commit a transaction that changes no session: raises if commits still fail."""

    async def close(self) -> None:
        """Finish every queued operation and close."""
