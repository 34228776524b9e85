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
``failed``), by whoever knows it, and so are WhatsApp's receipts (``delivered``,
``read``, or ``failed`` after all).

**The event log.** Every write that changes a session or a message's status
notes its change (``events.Change``); the transaction appends them to the log
at its very end: it raises the one-row counter ``event_log.last`` by their
number and inserts them with the numbers it got. The counter's row stays
locked until COMMIT, so a second appender (another node's writer) waits for
the first to commit: sequence numbers follow commit order, which an identity
column alone would not (a transaction that took 5 could commit after one that
took 6). Once committed, the events go to the store's listener, in commit
order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from service.domain import contract, events, receipts
from service.domain.contract import DELIVERED, READ, Status
from service.domain.events import Change, Event, EventPage, LogPosition
from service.domain.receipts import MessageReceipt
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
    "updated_at",
    "delivered_at",
    "read_at",
)
MESSAGE_TIMES = frozenset({"accepted_at", "updated_at", "delivered_at", "read_at"})
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
_MESSAGE_LIST = ", ".join(MESSAGE_COLUMNS)
_DELETE_SESSION = (
    f"DELETE FROM ll_whatsapp_qr_sessions WHERE id = ? RETURNING {', '.join(SESSION_COLUMNS)}"
)
_SELECT_MESSAGE = f"SELECT {_MESSAGE_LIST} FROM messages"
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MESSAGE_LIST}) VALUES ({', '.join('?' for _ in MESSAGE_COLUMNS)})"
)
_FINISH_MESSAGE = (
    "UPDATE messages SET status = ?, whatsapp_message_id = ?, error_code = ?, "
    "error_message = ?, finished_at = ?, updated_at = ? WHERE id = ? AND status IN (?, ?) "
    f"RETURNING {_MESSAGE_LIST}"
)
_MARK_UNKNOWN = (
    "UPDATE messages SET status = ?, error_code = ?, error_message = ?, finished_at = ?, "
    "updated_at = ? WHERE status = ?"
)
_PENDING_WITH_SESSIONS = (
    "SELECT m.id, s.instance_id FROM messages m "
    "JOIN ll_whatsapp_qr_sessions s ON s.id = m.session_id WHERE m.status = ?"
)
_GET_MESSAGE = (
    f"SELECT {', '.join('m.' + column for column in MESSAGE_COLUMNS)} FROM messages m "
    "JOIN ll_whatsapp_qr_sessions s ON s.id = m.session_id WHERE s.instance_id = ? AND m.id = ?"
)
#: What each receipt writes; the message must be its own, under that WhatsApp id.
_RECEIPT_SETS = {
    DELIVERED: "delivered_at = coalesce(delivered_at, ?)",
    READ: "delivered_at = coalesce(delivered_at, ?), read_at = ?",
    contract.FAILED: "error_code = ?, error_message = ?, finished_at = coalesce(finished_at, ?)",
}


def _receipt_query(status: contract.MessageStatus) -> str:
    allowed = receipts.predecessors(status)
    return (
        f"UPDATE messages SET status = ?, updated_at = ?, {_RECEIPT_SETS[status]} "
        "WHERE session_id = ? AND whatsapp_message_id = ? "
        f"AND status IN ({', '.join('?' for _ in allowed)}) RETURNING {_MESSAGE_LIST}"
    )


_RECEIPTS = {status: _receipt_query(status) for status in _RECEIPT_SETS}

EVENT_COLUMNS = (
    "sequence",
    "id",
    "type",
    "occurred_at",
    "instance_id",
    "session_id",
    "status",
    "previous_status",
    "data",
)
_INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in EVENT_COLUMNS)})"
)
_SELECT_EVENTS = (
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM events "
    "WHERE sequence > ? AND sequence <= ? ORDER BY sequence LIMIT ?"
)
#: Raises the counter by the number of events to append; the row stays locked until COMMIT.
_TAKE_SEQUENCES = "UPDATE event_log SET last = last + ? RETURNING last"
_LOG_POSITION = "SELECT last, trimmed FROM event_log"
#: The end of the oldest stretch of the log older than a time: the log's first rows only,
#: so that a trim with nothing to do reads little (times follow sequence numbers closely).
_OLD_EVENTS_END = (
    "SELECT max(sequence) FROM "
    "(SELECT sequence, occurred_at FROM events ORDER BY sequence LIMIT ?) AS oldest "
    "WHERE occurred_at < ?"
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
EVENT_TYPE_CHECK = f"CHECK (type IN ({in_list(contract.EVENT_TYPE_TEXTS)}))"
#: The log's one-row counter (the latest sequence number given) and its trim point.
EVENT_LOG_TABLE = """
    CREATE TABLE event_log (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        last BIGINT NOT NULL CHECK (last >= 0),
        trimmed BIGINT NOT NULL CHECK (trimmed >= 0 AND trimmed <= last)
    );
    INSERT INTO event_log (last, trimmed) VALUES (0, 0);"""


class Db(Protocol):
    """One connection inside one transaction, as the SQL here uses it (``?`` placeholders)."""

    async def fetch(self, query: str, *args: Any) -> Sequence[Sequence[Any]]:
        """Every row of ``query``, each a sequence in the order of its columns."""

    async def execute(self, query: str, *args: Any) -> int:
        """Run ``query``; how many rows it changed."""

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``query`` once for each of ``rows``."""

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

    async def read_snapshot(self, operation: Operation[T]) -> T:
        """Run reads that must see one committed state, outside the writer's queue
        (when ``reads_apart``)."""

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


def _message_from_row(instance_id: str, row: Sequence[Any], db: Db) -> Message:
    """A message from its row, in ``MESSAGE_COLUMNS`` order; ``instance_id`` is its session's."""
    values = dict(zip(MESSAGE_COLUMNS, row, strict=True))
    for name in MESSAGE_TIMES:
        values[name] = db.decode_time(values[name])
    status = contract.message_status_from_text(values.pop("status"))
    return Message(instance_id=instance_id, status=status, **values)


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
        db.encode_time(message.updated_at or message.accepted_at),
        db.encode_time(message.delivered_at),
        db.encode_time(message.read_at),
    ]


def _event_values(event: Event, db: Db) -> list[Any]:
    return [
        event.sequence,
        event.id,
        event.type,
        db.encode_time(event.occurred_at),
        event.instance_id,
        event.session_id,
        event.status,
        event.previous_status,
        event.data,
    ]


def _event_from_row(row: Sequence[Any], db: Db) -> Event:
    values = dict(zip(EVENT_COLUMNS, row, strict=True))
    values["occurred_at"] = db.decode_time(values["occurred_at"])
    return Event(**values)


async def append_events(db: Db, changes: Sequence[Change]) -> list[Event]:
    """Append ``changes`` to the log, numbered in order; the transaction must commit next.

    Raising the counter locks its row until COMMIT: another appender waits, so
    the numbers follow commit order.
    """
    if not changes:
        return []
    rows = await db.fetch(_TAKE_SEQUENCES, len(changes))
    first = int(rows[0][0]) - len(changes) + 1
    appended = [change.appended(first + n) for n, change in enumerate(changes)]
    await db.execute_many(_INSERT_EVENT, [_event_values(event, db) for event in appended])
    return appended


async def read_log_position(db: Db) -> LogPosition:
    rows = await db.fetch(_LOG_POSITION)
    return LogPosition(last=int(rows[0][0]), trimmed=int(rows[0][1]))


async def read_events(db: Db, after: int, limit: int) -> EventPage:
    """Up to ``limit`` events after ``after``, in order, and where the log stands.

    Read in one snapshot (or one transaction): an event trimmed meanwhile
    cannot go missing unnoticed, and one committed meanwhile is left for the
    next page.
    """
    position = await read_log_position(db)
    rows = await db.fetch(_SELECT_EVENTS, after, position.last, limit)
    found = [_event_from_row(row, db) for row in rows]
    through = found[-1].sequence if len(found) == limit else max(after, position.last)
    return EventPage(found, through, position.last, position.trimmed)


class NoFence:
    """One server owns every session: every write may happen."""

    async def check(self, db: Db, instance_id: str) -> None:
        return None


class SqlStore:
    """Sessions, messages and their event log in one database; every method is one
    committed operation."""

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
        #: The changes the transaction under way appends to the log at its end.
        self._changes: list[Change] = []
        self._on_events: Callable[[list[Event]], None] = lambda appended: None

    def on_events(self, listener: Callable[[list[Event]], None]) -> None:
        """Hand every committed transaction's events to ``listener``, in commit order."""
        self._on_events = listener

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
        changes: list[Change] = []
        appended: list[Event] = []

        async def append(db: Db) -> None:
            appended.extend(await append_events(db, changes))

        self._changes = changes  # the writer runs one transaction at a time
        self._busy_since = time.monotonic()
        try:
            results = await self.backend.transaction([*operations, append])
        except Exception as error:
            if failures.cause_of(error) is not None:
                self._set_failing(True, error)
            raise
        finally:
            self._busy_since = None
        self._set_failing(False)
        if appended:
            self._on_events(appended)
        return results[:-1]

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

    async def _read_consistent(self, operation: Operation[T]) -> T:
        """Reads that must see one committed state: a snapshot, or the writer's transaction."""
        if self.backend.reads_apart:
            return await self.backend.read_snapshot(operation)
        return await self.run(operation)

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
            created = dataclasses.replace(session, id=row_id)
            self._changes.append(events.session_updated(created, None))
            return row_id

        return await self.run(operation)

    async def update_session(self, session: Session, previous: Status | None = None) -> None:
        """Store the next revision of a session; the stored one must be revision - 1.

        ``previous`` is the status it had, for the log (a stream filtered by
        status sees a session leave it).
        """

        async def operation(db: Db) -> None:
            await self.fence.check(db, session.instance_id)
            values = session_values(session, db.encode_time)
            if await db.execute(_UPDATE_SESSION, *values, session.id, session.revision - 1) != 1:
                raise StaleRevision(
                    f"{session.instance_id} is not at revision {session.revision - 1}"
                )
            self._changes.append(events.session_updated(session, previous))

        await self.run(operation)

    async def delete_session(self, session: SessionRef, at: datetime | None = None) -> None:
        """Delete a session and its messages; the log keeps its last state, deleted at ``at``
        (by default, the time of its last change)."""

        async def operation(db: Db) -> None:
            await self.fence.check(db, session.instance_id)
            for row in await db.fetch(_DELETE_SESSION, session.id):
                deleted = session_from_row(row, db.decode_time)
                self._changes.append(events.session_deleted(deleted, at or deleted.updated_at))

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
            self._changes.append(events.message_updated(message))

        await self.run(operation)

    async def finish_message(self, message: Message, finished_at: datetime) -> bool:
        """Record the outcome of a message still ``pending`` or ``unknown``; whether it did.

        Forward only and by message id, whoever owns the session now: an
        outcome never replaces another outcome.
        """

        async def operation(db: Db) -> bool:
            rows = await db.fetch(
                _FINISH_MESSAGE,
                contract.message_status_text(message.status),
                message.whatsapp_message_id,
                message.error_code,
                message.error_message,
                db.encode_time(finished_at),
                db.encode_time(finished_at),
                message.id,
                *OPEN_MESSAGE_STATUSES,
            )
            for row in rows:
                finished = _message_from_row(message.instance_id, row, db)
                self._changes.append(events.message_updated(finished))
            return bool(rows)

        return await self.run(operation)

    async def apply_receipt(
        self, session: SessionRef, receipt: MessageReceipt, now: datetime
    ) -> list[Message]:
        """Record WhatsApp's receipt for the session's messages it names; those it moved.

        Forward only (``receipts``), by WhatsApp's message id, unfenced like an
        outcome: a message already past the receipt's status is left as it is.
        """
        status = contract.message_status_text(receipt.status)
        allowed = [contract.message_status_text(s) for s in receipts.predecessors(receipt.status)]
        query = _RECEIPTS[receipt.status]

        async def operation(db: Db) -> list[Message]:
            fields = _receipt_fields(receipt, db)
            moved: list[Message] = []
            for whatsapp_id in receipt.whatsapp_message_ids:
                rows = await db.fetch(
                    query,
                    status,
                    db.encode_time(now),
                    *fields,
                    session.id,
                    whatsapp_id,
                    *allowed,
                )
                moved += [_message_from_row(session.instance_id, row, db) for row in rows]
            self._changes.extend(events.message_updated(message) for message in moved)
            return moved

        return await self.run(operation)

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        async def operation(db: Db) -> Message | None:
            rows = await db.fetch(
                f"{_SELECT_MESSAGE} WHERE session_id = ? AND idempotency_key = ?",
                session.id,
                idempotency_key,
            )
            return _message_from_row(session.instance_id, rows[0], db) if rows else None

        return await self.run(operation)

    async def get_message(self, instance_id: str, message_id: str) -> Message | None:
        """The message ``message_id`` of the session ``instance_id``, if it sent one."""

        async def operation(db: Db) -> Message | None:
            rows = await db.fetch(_GET_MESSAGE, instance_id, message_id)
            return _message_from_row(instance_id, rows[0], db) if rows else None

        if self.backend.reads_apart:
            return await self.backend.read(operation)
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
        query += f" RETURNING {_MESSAGE_LIST}"
        unknown = contract.message_status_text(contract.UNKNOWN_MESSAGE)
        pending = contract.message_status_text(contract.PENDING)

        async def operation(db: Db) -> int:
            sessions = {row[0]: row[1] for row in await db.fetch(_PENDING_WITH_SESSIONS, pending)}
            when = db.encode_time(at)
            rows = await db.fetch(query, unknown, code, message, when, when, pending, *only)
            for row in rows:
                marked = _message_from_row(sessions[row[0]], row, db)
                self._changes.append(events.message_updated(marked))
            return len(rows)

        return await self.run(operation)

    # The event log.

    async def log_position(self) -> LogPosition:
        """The latest sequence number given and the last one trimmed."""
        return await self._read_consistent(read_log_position)

    async def read_events(self, after: int, limit: int) -> EventPage:
        """Up to ``limit`` events after the sequence number ``after``, in order.

        The page says how far it read (``through``: the next page starts after
        it) and where the log stands; a reader whose ``after`` is below
        ``trimmed`` has missed events that are gone.
        """
        return await self._read_consistent(lambda db: read_events(db, after, limit))

    async def current_state(
        self, status: Status | None, instance_id_prefix: str
    ) -> tuple[list[Session], int]:
        """Every session in ``status`` (any, if None) whose instance_id starts with the prefix,
        ordered by instance_id, and the sequence number of the last event they reflect."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(contract.status_text(status))
        if instance_id_prefix:
            where.append("substr(instance_id, 1, ?) = ?")
            params += [len(instance_id_prefix), instance_id_prefix]
        query = f"{SELECT_SESSION} WHERE {' AND '.join(where)} ORDER BY instance_id"

        async def operation(db: Db) -> tuple[list[Session], int]:
            position = await read_log_position(db)
            rows = await db.fetch(query, *params)
            return [session_from_row(row, db.decode_time) for row in rows], position.last

        return await self._read_consistent(operation)

    async def trim_events(self, before: datetime, batch: int) -> int:
        """Remove up to ``batch`` of the oldest events, those older than ``before``; how many.

        What goes is always a prefix of the log: the trim point only moves up.
        """

        async def operation(db: Db) -> int:
            rows = await db.fetch(_OLD_EVENTS_END, batch, db.encode_time(before))
            end = rows[0][0]
            if end is None:
                return 0
            removed = await db.execute("DELETE FROM events WHERE sequence <= ?", end)
            await db.execute("UPDATE event_log SET trimmed = ? WHERE trimmed < ?", end, end)
            return removed

        return await self.run(operation)


def _receipt_fields(receipt: MessageReceipt, db: Db) -> list[Any]:
    """The values of ``_RECEIPT_SETS`` for the receipt's status, in order."""
    at = db.encode_time(receipt.at)
    if receipt.status == DELIVERED:
        return [at]
    if receipt.status == READ:
        return [at, at]
    return [receipt.code, receipt.message, at]
