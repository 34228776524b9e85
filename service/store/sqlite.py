"""The SQLite file: one connection, one writer, the shared SQL (``service.store.sql``).

Every operation, read or write, goes through one queue served by one task in
order (``service.store.writer``). Writes that arrive together are committed in
one transaction (group commit); an operation returns only after its
transaction is durably committed (WAL, ``synchronous=FULL``). Reads see only
committed data. A failed COMMIT is rolled back: a commit here is never in
doubt.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from service.domain import contract
from service.faults import FaultPoints
from service.store import failures, sql
from service.store.port import SchemaTooNew as SchemaTooNew  # re-exported
from service.store.sql import Operation

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        status TEXT NOT NULL {sql.MESSAGE_STATUS_CHECK},
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
            length(instance_id) BETWEEN 1 AND {contract.INSTANCE_ID_MAX}
            AND substr(instance_id, 1, 1) GLOB '[{contract.INSTANCE_ID_FIRST}]'
            AND instance_id NOT GLOB '*[^{contract.INSTANCE_ID_REST}]*'
        ),
        phone_number TEXT,
        status TEXT NOT NULL,
        qr_status TEXT NOT NULL,
        qr_string TEXT,
        qr_generated_at TEXT,
        qr_expires_at TEXT,
        connected_at TEXT,
        disconnected_at TEXT,
        last_error_code TEXT,
        last_error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        revision INTEGER NOT NULL,{sql.SESSION_CHECKS}
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
    # 3: where the health probe writes (and removes) a page, as a change would.
    """
    CREATE TABLE store_probe (payload BLOB NOT NULL);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class Connection:
    """The SQLite connection as the shared SQL uses it (``sql.Db``)."""

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return list(await self.raw.execute_fetchall(query, args))

    async def execute(self, query: str, *args: Any) -> int:
        cursor = await self.raw.execute(query, args)
        changed = cursor.rowcount
        await cursor.close()
        return changed

    encode_time = staticmethod(_ts)
    decode_time = staticmethod(_dt)


class SQLite:
    """The SQLite file as the shared SQL's backend: one connection, WAL, full sync."""

    reads_apart = False

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self.db = Connection(connection)
        #: Fault points (tests): a commit may be made to fail, as with a full disk.
        self.faults = FaultPoints()

    async def transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT``; a failed COMMIT is rolled back: never in doubt."""
        raw = self.db.raw
        await raw.execute("BEGIN IMMEDIATE")
        try:
            results = [await operation(self.db) for operation in operations]
            self.faults.hit("commit")
            await raw.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await raw.execute("ROLLBACK")
            raise
        return results

    def retry_alone(self, error: Exception) -> bool:
        return True

    async def read(self, operation: Operation[T]) -> T:
        raise AssertionError("SQLite reads go through the writer")

    async def probe(self, db: sql.Db) -> None:
        """Write a page and remove it again: a commit that needs room, as a change does."""
        await db.execute("INSERT INTO store_probe VALUES (zeroblob(4096))")
        await db.execute("DELETE FROM store_probe")

    async def close(self) -> None:
        """Checkpoint the WAL and close the file."""
        with contextlib.suppress(sqlite3.Error):
            await self.db.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await self.db.raw.close()


class Store(sql.SqlStore):
    """The SQLite file; every method is one operation, committed before it returns."""

    def __init__(self, backend: SQLite, path: Path) -> None:
        super().__init__(backend)
        self.path = path

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
        return cls(SQLite(db), path)


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
