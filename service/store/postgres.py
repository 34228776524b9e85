"""The sessions in PostgreSQL: one connection, one writer, the same promises as SQLite.

Selected by a ``postgresql://`` URL in ``--database``. Every operation, read
or write, goes through one queue served by one task in order
(``service.store.writer``, as for SQLite); operations
that arrive together are committed in one transaction (group commit), and an
operation returns only after its transaction is committed with
``synchronous_commit = on`` (flushed to the server's WAL). Reads see only
committed data.

One server per database: the store's connection holds a session-level
advisory lock for as long as it is open. PostgreSQL drops it when the
connection ends, however it ends; a store that lost its connection takes the
lock again before it writes anything more, and stops if another server holds
it by then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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
from service.store.messages import Message
from service.store.port import LeaseLost, SchemaTooNew, StaleRevision
from service.store.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[asyncpg.Connection], Awaitable[T]]
#: How long one statement may take before the store gives up on it (a stalled network).
_COMMAND_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 10.0
#: How long PostgreSQL lets a transaction of a node sit idle, or wait for a lock, before
#: it ends it: a node frozen (or cut off) inside a transaction must not hold a lease row
#: (and so the take-over of its sessions) for longer than that.
STALL_LIMIT = 5.0
URL_SCHEMES = ("postgresql", "postgres")


def lock_key(node_id: str) -> int:
    """The advisory lock that says "node ``node_id`` serves this database"."""
    digest = hashlib.sha256(f"session-manager/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Fence(Protocol):
    """The leases this node holds: every session write carries one (several nodes)."""

    def token(self, instance_id: str) -> tuple[str, int]:
        """The owner and epoch this node holds for the session; raises LeaseLost if none."""

    def rejected(self, instance_id: str) -> None:
        """The database refused a write: the lease is no longer this node's."""


def is_url(database: str) -> bool:
    """Whether ``--database`` names a PostgreSQL server rather than a SQLite file."""
    return urlsplit(database).scheme in URL_SCHEMES


def display(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


# Each entry migrates the schema from version N to N + 1 (table schema_version).
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE ll_whatsapp_qr_sessions (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        -- Byte order, as in SQLite: pages and their order do not depend on a locale.
        instance_id text COLLATE "C" NOT NULL UNIQUE
            CHECK (instance_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$'),
        phone_number text,
        status text NOT NULL CHECK (status IN ({_one_of(STATUS_TEXTS)})),
        qr_status text NOT NULL CHECK (qr_status IN ({_one_of(QR_STATUS_TEXTS)})),
        qr_string text,
        qr_generated_at timestamptz,
        qr_expires_at timestamptz,
        connected_at timestamptz,
        disconnected_at timestamptz,
        last_error_code text,
        last_error_message text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        revision bigint NOT NULL CHECK (revision >= 1),
        CHECK (qr_string IS NULL OR qr_status IN ('generated', 'expired')),
        CHECK (status <> 'connected' OR (phone_number IS NOT NULL AND connected_at IS NOT NULL)),
        CHECK (status <> 'error'
            OR (last_error_code IS NOT NULL AND last_error_message IS NOT NULL))
    );
    CREATE TABLE messages (
        id text PRIMARY KEY,
        session_id bigint NOT NULL
            REFERENCES ll_whatsapp_qr_sessions (id) ON DELETE CASCADE,
        idempotency_key text,
        request_digest text NOT NULL DEFAULT '',
        recipient text NOT NULL,
        text text NOT NULL,
        status text NOT NULL CHECK (status IN ({_one_of(MESSAGE_STATUS_TEXTS)})),
        whatsapp_message_id text,
        error_code text,
        error_message text,
        accepted_at timestamptz NOT NULL,
        finished_at timestamptz,
        UNIQUE (session_id, idempotency_key)
    );
    CREATE INDEX messages_by_session ON messages (session_id, accepted_at);
    CREATE INDEX messages_pending ON messages (id) WHERE status = 'pending';
    """,
    # Several nodes over one database (README, Running several nodes): who is alive,
    # who owns which session, and a notification for every committed change.
    """
    CREATE TABLE nodes (
        node_id text PRIMARY KEY,
        -- Each start of a node is a new incarnation: its old leases are not its own.
        incarnation text NOT NULL,
        -- Where the other nodes reach its gRPC server (host:port).
        address text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE leases (
        instance_id text COLLATE "C" PRIMARY KEY,
        -- '<node_id>/<incarnation>'; NULL once handed over.
        owner text,
        -- Raised by every take-over: a write that carries an older epoch changes nothing.
        epoch bigint NOT NULL CHECK (epoch >= 1),
        lease_until timestamptz NOT NULL
    );
    CREATE INDEX leases_by_owner ON leases (owner);
    -- The committed row rides along, so that a watcher on any node sees every
    -- revision; past the 8000-byte limit of a notification it is left out and
    -- the listener reads the row instead.
    CREATE FUNCTION session_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        row ll_whatsapp_qr_sessions;
        payload text;
    BEGIN
        IF TG_OP = 'DELETE' THEN row := OLD; ELSE row := NEW; END IF;
        payload := json_build_object(
            'instance_id', row.instance_id, 'id', row.id, 'revision', row.revision,
            'deleted', TG_OP = 'DELETE',
            'row', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE row_to_json(row) END)::text;
        IF octet_length(payload) > 7900 THEN
            payload := json_build_object(
                'instance_id', row.instance_id, 'id', row.id, 'revision', row.revision,
                'deleted', TG_OP = 'DELETE', 'row', NULL)::text;
        END IF;
        PERFORM pg_notify('session_changes', payload);
        RETURN NULL;
    END $$;
    CREATE TRIGGER session_changed
        AFTER INSERT OR UPDATE OR DELETE ON ll_whatsapp_qr_sessions
        FOR EACH ROW EXECUTE FUNCTION session_changed();
    """,
)
#: Where every committed change of a session is announced, in commit order
#: (payload: JSON with instance_id, id, revision, deleted, and the row itself
#: unless it would not fit: ``session_from_json``).
CHANGES_CHANNEL = "session_changes"
SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_COLUMNS = (
    "id, instance_id, phone_number, status, qr_status, qr_string, qr_generated_at, "
    "qr_expires_at, connected_at, disconnected_at, last_error_code, last_error_message, "
    "created_at, updated_at, revision"
)
_SESSION_ASSIGNMENTS = (
    "instance_id = $1, phone_number = $2, status = $3, qr_status = $4, qr_string = $5, "
    "qr_generated_at = $6, qr_expires_at = $7, connected_at = $8, disconnected_at = $9, "
    "last_error_code = $10, last_error_message = $11, created_at = $12, updated_at = $13, "
    "revision = $14"
)
_MESSAGE_COLUMNS = (
    "id, idempotency_key, recipient, text, status, whatsapp_message_id, error_code, "
    "error_message, accepted_at, request_digest"
)


class DatabaseInUse(RuntimeError):
    """Another server runs as the same node on this database."""

    def __init__(self, url: str, node_id: str) -> None:
        super().__init__(
            f"the database {display(url)} is in use by another server as node {node_id!r}; "
            "give each node its own --node-id"
        )


class DatabaseUnreachable(ConnectionError):
    """The server cannot be reached, did not answer in time, or ended the connection.

    An operation that meets it while committing may or may not have been committed.
    """


def _session_row(row: asyncpg.Record) -> Session:
    return Session(
        id=row["id"],
        instance_id=row["instance_id"],
        phone_number=row["phone_number"],
        status=status_from_text(row["status"]),
        qr_status=qr_status_from_text(row["qr_status"]),
        qr_string=row["qr_string"],
        qr_generated_at=row["qr_generated_at"],
        qr_expires_at=row["qr_expires_at"],
        connected_at=row["connected_at"],
        disconnected_at=row["disconnected_at"],
        last_error_code=row["last_error_code"],
        last_error_message=row["last_error_message"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
    )


def session_from_json(row: dict[str, Any]) -> Session:
    """A session from the ``row`` of a change notification (``row_to_json``)."""

    def time(name: str) -> datetime | None:
        value = row[name]
        return None if value is None else datetime.fromisoformat(value)

    return Session(
        id=row["id"],
        instance_id=row["instance_id"],
        phone_number=row["phone_number"],
        status=status_from_text(row["status"]),
        qr_status=qr_status_from_text(row["qr_status"]),
        qr_string=row["qr_string"],
        qr_generated_at=time("qr_generated_at"),
        qr_expires_at=time("qr_expires_at"),
        connected_at=time("connected_at"),
        disconnected_at=time("disconnected_at"),
        last_error_code=row["last_error_code"],
        last_error_message=row["last_error_message"],
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        revision=row["revision"],
    )


def _session_values(s: Session) -> tuple[Any, ...]:
    return (
        s.instance_id,
        s.phone_number,
        status_text(s.status),
        qr_status_text(s.qr_status),
        s.qr_string,
        s.qr_generated_at,
        s.qr_expires_at,
        s.connected_at,
        s.disconnected_at,
        s.last_error_code,
        s.last_error_message,
        s.created_at,
        s.updated_at,
        s.revision,
    )


def _message_row(session: SessionRef, row: asyncpg.Record) -> Message:
    return Message(
        id=row["id"],
        session_id=session.id,
        instance_id=session.instance_id,
        idempotency_key=row["idempotency_key"],
        recipient=row["recipient"],
        text=row["text"],
        status=message_status_from_text(row["status"]),
        whatsapp_message_id=row["whatsapp_message_id"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        accepted_at=row["accepted_at"],
        request_digest=row["request_digest"],
    )


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _an_operations_own(error: Exception) -> bool:
    """Whether a failed group is worth running again one by one: not when the database is gone."""
    return not isinstance(error, DatabaseUnreachable | DatabaseInUse)


def _row_count(status: str) -> int:
    """The number of rows a command changed, from its status (``UPDATE 3``)."""
    return int(status.rpartition(" ")[2])


class Store:
    """One PostgreSQL database; every method is one operation, committed before it returns."""

    def __init__(
        self,
        connection: asyncpg.Connection,
        url: str,
        node_id: str,
        stall_limit: float = STALL_LIMIT,
    ) -> None:
        self._db = connection
        self.url = url
        self.node_id = node_id
        self.stall_limit = stall_limit
        #: Fault points (tests): a commit may be made to fail, as with a full disk.
        self.faults = FaultPoints()
        #: The leases every session write must carry (set by the node before it writes).
        self.fence: Fence | None = None
        self._writer = Writer(self._transaction, retry_alone=_an_operations_own)
        #: Connections for single reads (GetSession on any node), opened as needed.
        self._readers = asyncpg.create_pool(
            url,
            min_size=0,
            max_size=4,
            timeout=_CONNECT_TIMEOUT,
            command_timeout=_COMMAND_TIMEOUT,
            server_settings={"application_name": "session-manager", **stall_settings(stall_limit)},
        )

    @classmethod
    async def open(cls, url: str, node_id: str, stall_limit: float = STALL_LIMIT) -> Store:
        """Connect, take the node's lock, and migrate the schema to this release's.

        A transaction stalled for ``stall_limit`` seconds is ended by the server.
        """
        connection = await _connect(url, node_id, stall_limit, migrate=True)
        store = cls(connection, url, node_id, stall_limit)
        await store._readers  # min_size 0: opens nothing yet
        return store

    async def close(self) -> None:
        """Finish every queued operation, then close the connection (which frees the lock)."""
        await self._writer.close()
        self._readers.terminate()
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await self._db.close(timeout=_CONNECT_TIMEOUT)
        self._db.terminate()

    async def run(self, operation: Operation[T]) -> T:
        """Run ``operation`` in the writer's next transaction; return once committed."""
        return await self._writer.run(operation)

    async def _transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        if self._db.is_closed():
            await self._reconnect()
        try:
            return await self._run_together(operations)
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
            if isinstance(error, OSError | TimeoutError) or self._db.is_closed():
                raise DatabaseUnreachable(
                    f"lost the connection to {display(self.url)}: {_describe(error)}"
                ) from error
            raise

    async def _run_together(self, operations: list[Operation[Any]]) -> list[Any]:
        transaction = self._db.transaction()
        await transaction.start()
        try:
            results = [await operation(self._db) for operation in operations]
            self.faults.hit("commit")
            await transaction.commit()
        except BaseException:
            if not self._db.is_closed():
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await transaction.rollback()
            raise
        return results

    async def _reconnect(self) -> None:
        """Connect again after the connection was lost, lock first: nobody else took over."""
        log.warning("reconnecting to the database %s", display(self.url))
        try:
            self._db = await _connect(self.url, self.node_id, self.stall_limit, migrate=False)
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
            raise DatabaseUnreachable(
                f"cannot reach {display(self.url)}: {_describe(error)}"
            ) from error

    async def _check_fence(self, db: asyncpg.Connection, instance_id: str) -> None:
        """Refuse the write unless this node still holds the session's lease (several nodes).

        The lease row stays share-locked until the transaction ends, so that a
        take-over waits for this write to commit and then sees it.
        """
        if self.fence is None:
            return
        owner, epoch = self.fence.token(instance_id)
        try:
            held = await db.fetchval(
                "SELECT true FROM leases WHERE instance_id = $1 AND owner = $2 AND epoch = $3 "
                "AND lease_until > clock_timestamp() FOR SHARE",
                instance_id,
                owner,
                epoch,
            )
        except asyncpg.LockNotAvailableError:  # lock_timeout: a take-over holds the row
            raise LeaseLost(instance_id, "its lease is being taken over") from None
        if not held:
            self.fence.rejected(instance_id)
            raise LeaseLost(instance_id, f"the database refused epoch {epoch}")

    # Sessions.

    async def get_session(self, instance_id: str) -> Session | None:
        """The committed session, read outside the writer's queue (one statement, any node).

        Every change acknowledged so far is committed, so a separate connection
        sees it; changes still queued were not acknowledged to anyone yet.
        """
        try:
            db = await self._readers.acquire(timeout=_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
            raise DatabaseUnreachable(
                f"cannot reach {display(self.url)}: {_describe(error)}"
            ) from error
        try:
            return await self.read_session(db, instance_id)
        except (OSError, TimeoutError, asyncpg.InterfaceError) as error:
            raise DatabaseUnreachable(
                f"lost the connection to {display(self.url)}: {_describe(error)}"
            ) from error
        finally:
            await self._readers.release(db)

    @staticmethod
    async def read_session(
        db: asyncpg.Connection | PoolConnectionProxy, instance_id: str
    ) -> Session | None:
        row = await db.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions WHERE instance_id = $1",
            instance_id,
        )
        return None if row is None else _session_row(row)

    async def load_sessions(self) -> list[Session]:
        async def operation(db: asyncpg.Connection) -> list[Session]:
            rows = await db.fetch(f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions")
            return [_session_row(row) for row in rows]

        return await self.run(operation)

    async def insert_session(self, session: Session) -> int:
        """Store a new session; returns its id. Raises asyncpg.UniqueViolationError if it exists."""

        async def operation(db: asyncpg.Connection) -> int:
            await self._check_fence(db, session.instance_id)
            row_id: int = await db.fetchval(
                "INSERT INTO ll_whatsapp_qr_sessions (instance_id, phone_number, status, "
                "qr_status, qr_string, qr_generated_at, qr_expires_at, connected_at, "
                "disconnected_at, last_error_code, last_error_message, created_at, updated_at, "
                "revision) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
                "RETURNING id",
                *_session_values(session),
            )
            return row_id

        return await self.run(operation)

    async def update_session(self, session: Session) -> None:
        """Store the next revision of a session; the stored one must be revision - 1."""

        async def operation(db: asyncpg.Connection) -> None:
            await self._check_fence(db, session.instance_id)
            status = await db.execute(
                f"UPDATE ll_whatsapp_qr_sessions SET {_SESSION_ASSIGNMENTS} "
                "WHERE id = $15 AND revision = $16",
                *_session_values(session),
                session.id,
                session.revision - 1,
            )
            if _row_count(status) != 1:
                raise StaleRevision(
                    f"{session.instance_id} is not at revision {session.revision - 1}"
                )

        await self.run(operation)

    async def delete_session(self, session: SessionRef) -> None:
        async def operation(db: asyncpg.Connection) -> None:
            await self._check_fence(db, session.instance_id)
            await db.execute("DELETE FROM ll_whatsapp_qr_sessions WHERE id = $1", session.id)

        await self.run(operation)

    async def list_sessions(self, after: str, limit: int, status: Status | None) -> list[Session]:
        """Up to ``limit`` sessions with ``instance_id > after``, ordered by instance_id."""
        query = f"SELECT {_SESSION_COLUMNS} FROM ll_whatsapp_qr_sessions WHERE instance_id > $1"
        params: list[object] = [after]
        if status is not None:
            params.append(status_text(status))
            query += f" AND status = ${len(params)}"
        params.append(limit)
        query += f" ORDER BY instance_id LIMIT ${len(params)}"

        async def operation(db: asyncpg.Connection) -> list[Session]:
            return [_session_row(row) for row in await db.fetch(query, *params)]

        return await self.run(operation)

    # Messages.

    async def insert_message(self, message: Message) -> None:
        """Record an accepted message. Raises asyncpg.UniqueViolationError on a repeated key."""

        async def operation(db: asyncpg.Connection) -> None:
            await self._check_fence(db, message.instance_id)
            await db.execute(
                "INSERT INTO messages (id, session_id, idempotency_key, request_digest, "
                "recipient, text, status, whatsapp_message_id, error_code, error_message, "
                "accepted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
                message.accepted_at,
            )

        await self.run(operation)

    async def finish_message(self, message: Message, finished_at: datetime) -> None:
        """Record the engine's result for a pending message."""

        async def operation(db: asyncpg.Connection) -> None:
            await self._check_fence(db, message.instance_id)
            await db.execute(
                "UPDATE messages SET status = $1, whatsapp_message_id = $2, error_code = $3, "
                "error_message = $4, finished_at = $5 WHERE id = $6",
                message_status_text(message.status),
                message.whatsapp_message_id,
                message.error_code,
                message.error_message,
                finished_at,
                message.id,
            )

        await self.run(operation)

    async def find_message(self, session: SessionRef, idempotency_key: str) -> Message | None:
        async def operation(db: asyncpg.Connection) -> Message | None:
            row = await db.fetchrow(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages "
                "WHERE session_id = $1 AND idempotency_key = $2",
                session.id,
                idempotency_key,
            )
            return None if row is None else _message_row(session, row)

        return await self.run(operation)

    async def mark_pending_unknown(
        self, code: str, message: str, at: datetime, session: SessionRef | None = None
    ) -> int:
        """Mark messages whose result was never recorded as unknown; returns how many."""
        query = (
            "UPDATE messages SET status = 'unknown', error_code = $1, error_message = $2, "
            "finished_at = $3 WHERE status = 'pending'"
        )
        params: list[Any] = [code, message, at]
        if session is not None:
            query += " AND session_id = $4"
            params.append(session.id)

        async def operation(db: asyncpg.Connection) -> int:
            if session is not None:
                await self._check_fence(db, session.instance_id)
            return _row_count(await db.execute(query, *params))

        return await self.run(operation)


def stall_settings(limit: float) -> dict[str, str]:
    """The server settings that end a transaction stalled for ``limit`` seconds."""
    milliseconds = str(max(1, round(limit * 1000)))
    return {"idle_in_transaction_session_timeout": milliseconds, "lock_timeout": milliseconds}


async def connect(url: str, stall_limit: float = STALL_LIMIT) -> asyncpg.Connection:
    """A connection to the sessions' database, durable commits, named in the server's views."""
    return await asyncpg.connect(
        url,
        timeout=_CONNECT_TIMEOUT,
        command_timeout=_COMMAND_TIMEOUT,
        # Durable before it returns, whatever the server's or the role's default.
        server_settings={
            "synchronous_commit": "on",
            "application_name": "session-manager",
            **stall_settings(stall_limit),
        },
    )


async def _connect(
    url: str, node_id: str, stall_limit: float, *, migrate: bool
) -> asyncpg.Connection:
    """A connection holding the node's lock, its schema this release's."""
    db = await connect(url, stall_limit)
    try:
        if not await db.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(node_id)):
            raise DatabaseInUse(url, node_id)
        if migrate:
            await _migrate(db)
    except BaseException:
        db.terminate()
        raise
    return db


async def _migrate(db: asyncpg.Connection) -> None:
    """Bring the schema to this release's; nodes starting together migrate one at a time."""
    await db.execute("SET lock_timeout = 0")  # as long as another node's migration takes
    await db.execute("SELECT pg_advisory_lock($1)", _MIGRATION_KEY)
    try:
        await _migrate_locked(db)
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_KEY)
        await db.execute("RESET lock_timeout")


_MIGRATION_KEY = lock_key("/migrations")


async def _migrate_locked(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version integer PRIMARY KEY, migrated_at timestamptz NOT NULL DEFAULT now())"
        )
        version: int = await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database has schema version {version}; this release knows up to {SCHEMA_VERSION}"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        log.info("migrating the database schema to version %d", target)
        async with db.transaction():
            await db.execute(MIGRATIONS[target - 1])
            await db.execute("INSERT INTO schema_version (version) VALUES ($1)", target)
