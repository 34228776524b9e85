"""All SQL of the Session Manager: one SQLite file, one connection, one writer.

Every operation, read or write, goes through one queue served by one task in
order (``service.store.writer``). Writes that arrive together are committed in
one transaction (group commit); an operation returns only after its
transaction is durably committed (WAL, ``synchronous=FULL``). Reads see only
committed data.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from service.domain.contract import (
    MESSAGE_STATUS_TEXTS,
    QR_STATUS_TEXTS,
    STATUS_TEXTS,
    Status,
    message_status_from_text,
    message_status_text,
    qr_status_from_text,
    qr_status_text,
    status_from_text,
    status_text,
)
from service.domain.states import Session, SessionRef
from service.faults import FaultPoints
from service.store import failures
from service.store.messages import Message
from service.store.port import SchemaTooNew as SchemaTooNew  # re-exported
from service.store.port import StaleRevision
from service.store.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[aiosqlite.Connection], Awaitable[T]]


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _messages_table(name: str, *more_columns: str) -> str:
    """The messages table; its status accepts the message statuses of the contract."""
    return f"""
    CREATE TABLE {name} (
        id TEXT PRIMARY KEY,
        session_id INTEGER NOT NULL
            REFERENCES ll_whatsapp_qr_sessions (id) ON DELETE CASCADE,
        idempotency_key TEXT,
        {" ".join(more_columns)}
        recipient TEXT NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({_in(MESSAGE_STATUS_TEXTS)})),
        whatsapp_message_id TEXT,
        error_code TEXT,
        error_message TEXT,
        accepted_at TEXT NOT NULL,
        finished_at TEXT,
        UNIQUE (session_id, idempotency_key)
    );"""


# Each entry migrates the schema from version N to N + 1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE ll_whatsapp_qr_sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id TEXT NOT NULL UNIQUE CHECK (
            length(instance_id) BETWEEN 1 AND 64
            AND substr(instance_id, 1, 1) GLOB '[A-Za-z0-9]'
            AND instance_id NOT GLOB '*[^A-Za-z0-9_.-]*'
        ),
        phone_number TEXT,
        status TEXT NOT NULL CHECK (status IN ({_in(STATUS_TEXTS)})),
        qr_status TEXT NOT NULL CHECK (qr_status IN ({_in(QR_STATUS_TEXTS)})),
        qr_string TEXT,
        qr_generated_at TEXT,
        qr_expires_at TEXT,
        connected_at TEXT,
        disconnected_at TEXT,
        last_error_code TEXT,
        last_error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        revision INTEGER NOT NULL CHECK (revision >= 1),
        CHECK (qr_string IS NULL OR qr_status IN ('generated', 'expired')),
        CHECK (status <> 'connected' OR (phone_number IS NOT NULL AND connected_at IS NOT NULL)),
        CHECK (status <> 'error'
            OR (last_error_code IS NOT NULL AND last_error_message IS NOT NULL))
    );
    {_messages_table("messages")}
    CREATE INDEX messages_by_session ON messages (session_id, accepted_at);
    """,
    # 2: each message keeps the digest of its request (a reused idempotency key
    # must name the same message), and may be `unknown`.
    f"""
    {_messages_table("messages_2", "request_digest TEXT NOT NULL DEFAULT '',")}
    INSERT INTO messages_2 (id, session_id, idempotency_key, recipient, text, status,
        whatsapp_message_id, error_code, error_message, accepted_at, finished_at)
        SELECT id, session_id, idempotency_key, recipient, text, status, whatsapp_message_id,
            error_code, error_message, accepted_at, finished_at FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_2 RENAME TO messages;
    CREATE INDEX messages_by_session ON messages (session_id, accepted_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_COLUMNS = (
    "id, instance_id, phone_number, status, qr_status, qr_string, qr_generated_at, "
    "qr_expires_at, connected_at, disconnected_at, last_error_code, last_error_message, "
    "created_at, updated_at, revision"
)
_MESSAGE_COLUMNS = (
    "id, idempotency_key, recipient, text, status, whatsapp_message_id, error_code, "
    "error_message, accepted_at, request_digest"
)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _session_row(row: sqlite3.Row | tuple[Any, ...]) -> Session:
    return Session(
        id=row[0],
        instance_id=row[1],
        phone_number=row[2],
        status=status_from_text(row[3]),
        qr_status=qr_status_from_text(row[4]),
        qr_string=row[5],
        qr_generated_at=_dt(row[6]),
        qr_expires_at=_dt(row[7]),
        connected_at=_dt(row[8]),
        disconnected_at=_dt(row[9]),
        last_error_code=row[10],
        last_error_message=row[11],
        created_at=_dt(row[12]),  # type: ignore[arg-type]
        updated_at=_dt(row[13]),  # type: ignore[arg-type]
        revision=row[14],
    )


def _session_values(s: Session) -> tuple[Any, ...]:
    return (
        s.instance_id,
        s.phone_number,
        status_text(s.status),
        qr_status_text(s.qr_status),
        s.qr_string,
        _ts(s.qr_generated_at),
        _ts(s.qr_expires_at),
        _ts(s.connected_at),
        _ts(s.disconnected_at),
        s.last_error_code,
        s.last_error_message,
        _ts(s.created_at),
        _ts(s.updated_at),
        s.revision,
    )


def _message_row(session: SessionRef, row: sqlite3.Row | tuple[Any, ...]) -> Message:
    return Message(
        id=row[0],
        session_id=session.id,
        instance_id=session.instance_id,
        idempotency_key=row[1],
        recipient=row[2],
        text=row[3],
        status=message_status_from_text(row[4]),
        whatsapp_message_id=row[5],
        error_code=row[6],
        error_message=row[7],
        accepted_at=_dt(row[8]),  # type: ignore[arg-type]
        request_digest=row[9],
    )


class Store:
    """The SQLite file; every method is one operation, committed before it returns."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        #: Fault points (tests): a commit may be made to fail, as with a full disk.
        self.faults = FaultPoints()
        self._writer = Writer(self._transaction)

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
            await failures.check_usable(db)
            await _migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        """Finish every queued operation, checkpoint the WAL and close the file."""
        await self._writer.close()
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await self._db.close()

    async def run(self, operation: Operation[T]) -> T:
        """Run ``operation`` in the writer's next transaction; return once committed."""
        return await self._writer.run(operation)

    async def _transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            results = [await operation(self._db) for operation in operations]
            self.faults.hit("commit")
            await self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            raise
        return results

    # Sessions.

    async def load_sessions(self) -> list[Session]:
        async def operation(db: aiosqlite.Connection) -> list[Session]:
            rows = await db.execute_fetchall(
                f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions"
            )
            return [_session_row(row) for row in rows]

        return await self.run(operation)

    async def get_session(self, instance_id: str) -> Session | None:
        async def operation(db: aiosqlite.Connection) -> Session | None:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions WHERE instance_id = ?",
                    (instance_id,),
                )
            )
            return _session_row(rows[0]) if rows else None

        return await self.run(operation)

    async def insert_session(self, session: Session) -> int:
        """Store a new session; returns its id. Raises sqlite3.IntegrityError if it exists."""

        async def operation(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO ll_whatsapp_qr_sessions (instance_id, phone_number, status, "
                "qr_status, qr_string, qr_generated_at, qr_expires_at, connected_at, "
                "disconnected_at, last_error_code, last_error_message, created_at, updated_at, "
                "revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _session_values(session),
            )
            row_id = cursor.lastrowid
            await cursor.close()
            assert row_id is not None
            return row_id

        return await self.run(operation)

    async def update_session(self, session: Session) -> None:
        """Store the next revision of a session; the stored one must be revision - 1."""

        async def operation(db: aiosqlite.Connection) -> None:
            cursor = await db.execute(
                "UPDATE ll_whatsapp_qr_sessions SET instance_id = ?, phone_number = ?, "
                "status = ?, qr_status = ?, qr_string = ?, qr_generated_at = ?, "
                "qr_expires_at = ?, connected_at = ?, disconnected_at = ?, last_error_code = ?, "
                "last_error_message = ?, created_at = ?, updated_at = ?, revision = ? "
                "WHERE id = ? AND revision = ?",
                (*_session_values(session), session.id, session.revision - 1),
            )
            changed = cursor.rowcount
            await cursor.close()
            if changed != 1:
                raise StaleRevision(
                    f"{session.instance_id} is not at revision {session.revision - 1}"
                )

        await self.run(operation)

    async def delete_session(self, session: SessionRef) -> None:
        async def operation(db: aiosqlite.Connection) -> None:
            await db.execute("DELETE FROM ll_whatsapp_qr_sessions WHERE id = ?", (session.id,))

        await self.run(operation)

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""
        where, params = "instance_id > ?", [after]
        if status is not None:
            where += " AND status = ?"
            params.append(status_text(status))

        async def operation(db: aiosqlite.Connection) -> list[Session]:
            rows = await db.execute_fetchall(
                f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions WHERE {where} "
                "ORDER BY instance_id LIMIT ?",
                (*params, limit),
            )
            return [_session_row(row) for row in rows]

        return await self.run(operation)

    # Messages.

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message. Raises sqlite3.IntegrityError on a repeated key."""

        async def operation(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO messages (id, session_id, idempotency_key, request_digest, "
                "recipient, text, status, whatsapp_message_id, error_code, error_message, "
                "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.session_id,
                    message.idempotency_key,
                    message.request_digest,
                    message.recipient,
                    message.text,
                    message_status_text(message.status),
                    message.whatsapp_message_id,
                    message.error_code,
                    message.error_message,
                    _ts(message.accepted_at),
                ),
            )

        await self.run(operation)

    async def finish_message(self, message: Message, finished_at: datetime) -> None:
        """Record the engine's result for a pending message."""

        async def operation(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE messages SET status = ?, whatsapp_message_id = ?, error_code = ?, "
                "error_message = ?, finished_at = ? WHERE id = ?",
                (
                    message_status_text(message.status),
                    message.whatsapp_message_id,
                    message.error_code,
                    message.error_message,
                    _ts(finished_at),
                    message.id,
                ),
            )

        await self.run(operation)

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        async def operation(db: aiosqlite.Connection) -> Message | None:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages "
                    "WHERE session_id = ? AND idempotency_key = ?",
                    (session.id, idempotency_key),
                )
            )
            return _message_row(session, rows[0]) if rows else None

        return await self.run(operation)

    async def mark_pending_unknown(
        self, code: str, message: str, at: datetime, session: SessionRef | None = None
    ) -> int:
        """Mark messages whose result was never recorded as unknown; returns how many."""
        query = (
            "UPDATE messages SET status = 'unknown', error_code = ?, error_message = ?, "
            "finished_at = ? WHERE status = 'pending'"
        )
        params: tuple[Any, ...] = (code, message, _ts(at))
        if session is not None:
            query += " AND session_id = ?"
            params += (session.id,)

        async def operation(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(query, params)
            changed = cursor.rowcount
            await cursor.close()
            return changed

        return await self.run(operation)


async def _migrate(db: aiosqlite.Connection) -> None:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    version = int(rows[0][0])
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database has schema version {version}; this release knows up to {SCHEMA_VERSION}"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        log.info("migrating the database schema to version %d", target)
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
