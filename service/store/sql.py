"""The sessions' and messages' SQL, written once for both databases.

``SqlStore`` is the one implementation of the store port. Each of its
operations is a small function of a ``Db`` (one connection, in the writer's
transaction) whose SQL is written once, with ``?`` placeholders; a
``Backend`` (``sqlite.SQLite``, ``postgres.PostgreSQL``) says how to connect
and migrate, spells placeholders and times for its driver, runs one
transaction, and settles one whose commit acknowledgement was lost.

Every operation, read or write, waits in the one writer's queue
(``service.store.writer``) and is committed with the others that arrived with
it (group commit); it returns only once its transaction is durably
committed. Session writes and message intents pass the backend's fence, when
it has one (several nodes: the session's lease); a message's outcome does not:
it is written forward only (``pending`` or ``unknown`` to ``sent`` or
``failed``), by whoever knows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from service.domain import contract
from service.domain.contract import Status
from service.domain.states import Session, SessionRef
from service.faults import FaultPoints
from service.store import failures
from service.store.messages import Message
from service.store.port import StaleRevision
from service.store.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A transaction that has waited this long for the database counts as failing: a node
#: whose writer hangs (a route that drops packets) must not look healthy meanwhile.
STALLED = 3.0

SESSION_COLUMNS = (
    "id",
    "instance_id",
    "phone_number",
    "status",
    "qr_status",
    "qr_string",
    "qr_generated_at",
    "qr_expires_at",
    "connected_at",
    "disconnected_at",
    "last_error_code",
    "last_error_message",
    "created_at",
    "updated_at",
    "revision",
)
SESSION_TIMES = frozenset(
    {
        "qr_generated_at",
        "qr_expires_at",
        "connected_at",
        "disconnected_at",
        "created_at",
        "updated_at",
    }
)
MESSAGE_COLUMNS = (
    "id",
    "session_id",
    "idempotency_key",
    "request_digest",
    "recipient",
    "text",
    "status",
    "whatsapp_message_id",
    "error_code",
    "error_message",
    "accepted_at",
)
#: The message statuses an outcome may replace (forward only).
OPEN_MESSAGE_STATUSES = (
    contract.message_status_text(contract.PENDING),
    contract.message_status_text(contract.UNKNOWN_MESSAGE),
)

SELECT_SESSION = f"SELECT {', '.join(SESSION_COLUMNS)} FROM ll_whatsapp_qr_sessions"
_INSERT_SESSION = (
    f"INSERT INTO ll_whatsapp_qr_sessions ({', '.join(SESSION_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' for _ in SESSION_COLUMNS[1:])}) RETURNING id"
)
_UPDATE_SESSION = (
    "UPDATE ll_whatsapp_qr_sessions SET "
    + ", ".join(f"{column} = ?" for column in SESSION_COLUMNS[1:])
    + " WHERE id = ? AND revision = ?"
)
_SELECT_MESSAGE = f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages"
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in MESSAGE_COLUMNS)})"
)
_FINISH_MESSAGE = (
    "UPDATE messages SET status = ?, whatsapp_message_id = ?, error_code = ?, "
    "error_message = ?, finished_at = ? WHERE id = ? AND status IN (?, ?)"
)
_MARK_UNKNOWN = (
    "UPDATE messages SET status = ?, error_code = ?, error_message = ?, finished_at = ? "
    "WHERE status = ?"
)


def in_list(values: Sequence[str]) -> str:
    """``'a', 'b'``: the contract's texts inside a CHECK constraint."""
    return ", ".join(f"'{value}'" for value in values)


#: The CHECK constraints of a session row, shared by both schemas.
SESSION_CHECKS = f"""
        CHECK (status IN ({in_list(contract.STATUS_TEXTS)})),
        CHECK (qr_status IN ({in_list(contract.QR_STATUS_TEXTS)})),
        CHECK (revision >= 1),
        CHECK (qr_string IS NULL OR qr_status IN ('generated', 'expired')),
        CHECK (status <> 'connected' OR (phone_number IS NOT NULL AND connected_at IS NOT NULL)),
        CHECK (status <> 'error'
            OR (last_error_code IS NOT NULL AND last_error_message IS NOT NULL))"""
MESSAGE_STATUS_CHECK = f"CHECK (status IN ({in_list(contract.MESSAGE_STATUS_TEXTS)}))"


class Db(Protocol):
    """One connection inside one transaction, as the SQL here uses it (``?`` placeholders)."""

    async def fetch(self, query: str, *args: Any) -> Sequence[Sequence[Any]]:
        """Every row of ``query``, each a sequence in the order of its columns."""

    async def execute(self, query: str, *args: Any) -> int:
        """Run ``query``; how many rows it changed."""

    def encode_time(self, value: datetime | None) -> Any:
        """A time as the driver stores it."""

    def decode_time(self, value: Any) -> datetime | None:
        """A stored time as a ``datetime`` in UTC."""


Operation = Callable[[Db], Awaitable[T]]


class Fence(Protocol):
    """What a write for a session must pass first (several nodes: that its lease is held).

    It raises the contract error (SESSION_MOVING) when the write must not happen.
    """

    async def check(self, db: Db, instance_id: str) -> None: ...


class Backend(Protocol):
    """One database: its connections, its dialect, and how it runs a transaction."""

    #: Fault points (tests): a commit can be made to fail, as with a full disk.
    faults: FaultPoints

    async def transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        """Run ``operations`` in one transaction and commit it; their results.

        A commit whose acknowledgement was lost is settled before this returns:
        its results if it landed, ``DatabaseUnreachable`` if it did not, or
        ``CommitUnknown`` if that could not be found out in time.
        """

    def retry_alone(self, error: Exception) -> bool:
        """Whether a group that failed with ``error`` is worth running again one by one."""

    #: Whether single reads run outside the writer's queue (``read``), on other connections.
    reads_apart: bool

    async def read(self, operation: Operation[T]) -> T:
        """Run a single read outside the writer's queue (when ``reads_apart``)."""

    async def probe(self, db: Db) -> None:
        """Write what a commit must write, touching no session (a health probe)."""

    async def close(self) -> None: ...


def session_from_row(row: Sequence[Any], decode_time: Callable[[Any], datetime | None]) -> Session:
    """A session from its row, in ``SESSION_COLUMNS`` order.

    Every stored session passes here at start-up (100,000 in about a third of a
    second): the row is unpacked by position, not zipped into a dictionary.
    """
    (id_, instance_id, phone_number, status, qr_status, qr_string, qr_generated_at,
     qr_expires_at, connected_at, disconnected_at, last_error_code, last_error_message,
     created_at, updated_at, revision) = row  # fmt: skip
    return Session(
        id=id_,
        instance_id=instance_id,
        status=contract.status_from_text(status),
        qr_status=contract.qr_status_from_text(qr_status),
        created_at=decode_time(created_at),  # type: ignore[arg-type]
        updated_at=decode_time(updated_at),  # type: ignore[arg-type]
        revision=revision,
        phone_number=phone_number,
        qr_string=qr_string,
        qr_generated_at=decode_time(qr_generated_at),
        qr_expires_at=decode_time(qr_expires_at),
        connected_at=decode_time(connected_at),
        disconnected_at=decode_time(disconnected_at),
        last_error_code=last_error_code,
        last_error_message=last_error_message,
    )


def session_values(session: Session, encode_time: Callable[[Any], Any]) -> list[Any]:
    """A session's columns but ``id``, in ``SESSION_COLUMNS`` order, as the driver stores them."""
    values: list[Any] = []
    for name in SESSION_COLUMNS[1:]:
        value = getattr(session, name)
        if name in SESSION_TIMES:
            value = encode_time(value)
        elif name == "status":
            value = contract.status_text(value)
        elif name == "qr_status":
            value = contract.qr_status_text(value)
        values.append(value)
    return values


def _message_from_row(session: SessionRef, row: Sequence[Any], db: Db) -> Message:
    values = dict(zip(MESSAGE_COLUMNS, row, strict=True))
    return Message(
        id=values["id"],
        session_id=session.id,
        instance_id=session.instance_id,
        idempotency_key=values["idempotency_key"],
        recipient=values["recipient"],
        text=values["text"],
        status=contract.message_status_from_text(values["status"]),
        whatsapp_message_id=values["whatsapp_message_id"],
        error_code=values["error_code"],
        error_message=values["error_message"],
        accepted_at=db.decode_time(values["accepted_at"]),  # type: ignore[arg-type]
        request_digest=values["request_digest"],
    )


def _message_values(message: Message, db: Db) -> list[Any]:
    return [
        message.id,
        message.session_id,
        message.idempotency_key,
        message.request_digest,
        message.recipient,
        message.text,
        contract.message_status_text(message.status),
        message.whatsapp_message_id,
        message.error_code,
        message.error_message,
        db.encode_time(message.accepted_at),
    ]


class NoFence:
    """One server owns every session: every write may happen."""

    async def check(self, db: Db, instance_id: str) -> None:
        return None


class SqlStore:
    """Sessions and messages in one database; every method is one committed operation."""

    def __init__(self, backend: Backend, fence: Fence | None = None) -> None:
        self.backend = backend
        self.faults = backend.faults
        #: Checked by every session write and message intent (several nodes: the lease).
        self.fence: Fence = fence or NoFence()
        self._writer = Writer(self._transaction, retry_alone=backend.retry_alone)
        self._failing = False
        #: When the transaction under way began (``time.monotonic()``), if one is.
        self._busy_since: float | None = None
        #: Whether a transaction ever committed. Until one has, a failure is the start-up's
        #: to report (one line and its exit code), not a database that stopped working.
        self._committed = False

    async def close(self) -> None:
        """Commit every queued operation, then close the database."""
        await self._writer.close()
        await self.backend.close()

    async def run(self, operation: Operation[T]) -> T:
        """Run ``operation`` in the writer's next transaction; return once it is committed."""
        return await self._writer.run(operation)

    def commits_failing(self) -> bool:
        """Whether the last transaction failed for the storage's sake, or the one under way
        has waited for the database for longer than ``STALLED`` seconds (health reports it)."""
        busy_since = self._busy_since
        stalled = busy_since is not None and time.monotonic() - busy_since > STALLED
        return self._failing or stalled

    async def _transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        self._busy_since = time.monotonic()
        try:
            results = await self.backend.transaction(operations)
        except Exception as error:
            if failures.cause_of(error) is not None:
                self._set_failing(True, error)
            raise
        finally:
            self._busy_since = None
        self._set_failing(False)
        return results

    def _set_failing(self, failing: bool, error: BaseException | None = None) -> None:
        if self._committed and failing and not self._failing:
            log.error("the database stopped accepting commits: %s", error)
        elif self._committed and self._failing and not failing:
            log.info("the database accepts commits again")
        self._failing = failing
        self._committed = self._committed or not failing

    async def probe(self) -> None:
        """Commit a transaction that writes nothing of the sessions: whether commits work."""
        await self.run(self.backend.probe)

    # Sessions.

    async def load_sessions(self) -> list[Session]:
        async def operation(db: Db) -> list[Session]:
            return [session_from_row(row, db.decode_time) for row in await db.fetch(SELECT_SESSION)]

        return await self.run(operation)

    async def get_session(self, instance_id: str) -> Session | None:
        """The committed session ``instance_id`` (outside the writer's queue where possible)."""

        async def operation(db: Db) -> Session | None:
            rows = await db.fetch(f"{SELECT_SESSION} WHERE instance_id = ?", instance_id)
            return session_from_row(rows[0], db.decode_time) if rows else None

        if self.backend.reads_apart:
            return await self.backend.read(operation)
        return await self.run(operation)

    async def insert_session(self, session: Session) -> int:
        """Store a new session; its id. The driver's integrity error if the instance_id exists."""

        async def operation(db: Db) -> int:
            await self.fence.check(db, session.instance_id)
            rows = await db.fetch(_INSERT_SESSION, *session_values(session, db.encode_time))
            row_id: int = rows[0][0]
            return row_id

        return await self.run(operation)

    async def update_session(self, session: Session) -> None:
        """Store the next revision of a session; the stored one must be revision - 1."""

        async def operation(db: Db) -> None:
            await self.fence.check(db, session.instance_id)
            values = session_values(session, db.encode_time)
            if await db.execute(_UPDATE_SESSION, *values, session.id, session.revision - 1) != 1:
                raise StaleRevision(
                    f"{session.instance_id} is not at revision {session.revision - 1}"
                )

        await self.run(operation)

    async def delete_session(self, session: SessionRef) -> None:
        async def operation(db: Db) -> None:
            await self.fence.check(db, session.instance_id)
            await db.execute("DELETE FROM ll_whatsapp_qr_sessions WHERE id = ?", session.id)

        await self.run(operation)

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""
        where, params = "instance_id > ?", [after]
        if status is not None:
            where += " AND status = ?"
            params.append(contract.status_text(status))

        async def operation(db: Db) -> list[Session]:
            rows = await db.fetch(
                f"{SELECT_SESSION} WHERE {where} ORDER BY instance_id LIMIT ?", *params, limit
            )
            return [session_from_row(row, db.decode_time) for row in rows]

        return await self.run(operation)

    # Messages.

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message. The driver's integrity error on a repeated key."""

        async def operation(db: Db) -> None:
            await self.fence.check(db, message.instance_id)
            await db.execute(_INSERT_MESSAGE, *_message_values(message, db))

        await self.run(operation)

    async def finish_message(self, message: Message, finished_at: datetime) -> bool:
        """Record the outcome of a message still ``pending`` or ``unknown``; whether it did.

        Forward only and by message id, whoever owns the session now: an
        outcome never replaces another outcome.
        """

        async def operation(db: Db) -> bool:
            changed = await db.execute(
                _FINISH_MESSAGE,
                contract.message_status_text(message.status),
                message.whatsapp_message_id,
                message.error_code,
                message.error_message,
                db.encode_time(finished_at),
                message.id,
                *OPEN_MESSAGE_STATUSES,
            )
            return changed == 1

        return await self.run(operation)

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        async def operation(db: Db) -> Message | None:
            rows = await db.fetch(
                f"{_SELECT_MESSAGE} WHERE session_id = ? AND idempotency_key = ?",
                session.id,
                idempotency_key,
            )
            return _message_from_row(session, rows[0], db) if rows else None

        return await self.run(operation)

    async def mark_pending_unknown(
        self, code: str, message: str, at: datetime, session: SessionRef | None = None
    ) -> int:
        """Mark messages whose outcome was never recorded as unknown; how many.

        Every session's (at start-up), or only ``session``'s (a node taking it
        over). Forward only: a later outcome of the old owner still lands.
        """
        query = _MARK_UNKNOWN
        only: list[int] = []
        if session is not None:
            query += " AND session_id = ?"
            only.append(session.id)
        unknown = contract.message_status_text(contract.UNKNOWN_MESSAGE)
        pending = contract.message_status_text(contract.PENDING)

        async def operation(db: Db) -> int:
            return await db.execute(
                query, unknown, code, message, db.encode_time(at), pending, *only
            )

        return await self.run(operation)
