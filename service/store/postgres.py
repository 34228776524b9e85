"""PostgreSQL: one writer connection, the shared SQL (``service.store.sql``), settled commits.

Selected by a ``postgresql://`` URL in ``--database``. Every operation goes
through the one writer's queue, as with SQLite; single reads of a session use
a small pool of reader connections instead (any node answers GetSession).
A transaction commits with ``synchronous_commit = on``.

**One server per node id.** The writer's connection holds a session-level
advisory lock for as long as it is open. A writer that lost its connection
ends its own old backend (recorded when it connected) before it takes the lock
again: after a partition that dropped packets rather than closing sockets,
that backend would otherwise hold the lock until TCP keepalives end it.

**Settled commits.** Before COMMIT the writer notes the transaction's id.
When the connection is lost while COMMIT is on its way, it connects again,
ends the old backend (so the transaction can no longer be running) and asks
``pg_xact_status``: committed, the callers get their results; aborted, a
definite failure (nothing stored). When that cannot be found out within
``SETTLE_WITHIN`` seconds, the callers get ``CommitUnknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import socket
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.domain import contract
from service.domain.states import Session
from service.faults import FaultPoints
from service.store import sql
from service.store.failures import CommitUnknown
from service.store.failures import DatabaseInUse as DatabaseInUse  # re-exported
from service.store.failures import DatabaseUnreachable as DatabaseUnreachable  # re-exported
from service.store.port import SchemaTooNew
from service.store.sql import Operation

log = logging.getLogger(__name__)

T = TypeVar("T")
#: How long one statement of the writer may take before its connection is given up.
_COMMAND_TIMEOUT = 10.0
#: How long making a connection may take: a route that drops packets fails in seconds.
_CONNECT_TIMEOUT = 5.0
#: How long PostgreSQL lets a transaction of a node sit idle, or wait for a lock, before
#: it ends it: a node frozen (or cut off) inside a transaction must not hold a lease row
#: (and so the take-over of its sessions) for longer than that.
STALL_LIMIT = 5.0
#: How long a commit whose acknowledgement was lost may take to settle.
SETTLE_WITHIN = 5.0
#: How long a reconnecting writer waits for its old backend to end.
_END_WAIT = 3.0  # less than SETTLE_WITHIN
#: TCP keepalives on both ends of every connection: after this many silent seconds, a
#: probe a second, this many unanswered, and a peer that vanished without closing (a
#: dropped route, a frozen host) is given up in seconds, not hours.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 3
URL_SCHEMES = ("postgresql", "postgres")
#: Errors of the connection itself (not of a statement): the transaction's fate is
#: the server's alone to tell.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # a connection closed, or left in the middle of an operation
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


def end_pooled(db: PoolConnectionProxy) -> None:
    """End a pool's connection that failed; one the pool already let go of (asyncpg detaches
    a connection that closed) needs nothing more."""
    with contextlib.suppress(asyncpg.InterfaceError):
        db.terminate()


def lock_key(node_id: str) -> int:
    """The advisory lock that says "node ``node_id`` serves this database"."""
    digest = hashlib.sha256(f"session-manager/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


@functools.lru_cache(maxsize=512)
def numbered(query: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``, …"""
    count = iter(range(1, query.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", query)


def _row_count(status: str) -> int:
    """The number of rows a command changed, from its status (``UPDATE 3``)."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


def _same(value: datetime | None) -> datetime | None:
    return value


class Connection:
    """An asyncpg connection as the shared SQL uses it (``sql.Db``)."""

    def __init__(self, raw: asyncpg.Connection | PoolConnectionProxy) -> None:
        self.raw = raw

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return list(await self.raw.fetch(numbered(query), *args))

    async def execute(self, query: str, *args: Any) -> int:
        return _row_count(await self.raw.execute(numbered(query), *args))

    async def execute_many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(numbered(query), rows)

    encode_time = staticmethod(_same)
    decode_time = staticmethod(_same)


async def read_session(
    raw: asyncpg.Connection | PoolConnectionProxy, instance_id: str
) -> Session | None:
    """The committed session ``instance_id``, read on ``raw`` (any connection)."""
    rows = await Connection(raw).fetch(f"{sql.SELECT_SESSION} WHERE instance_id = ?", instance_id)
    return sql.session_from_row(rows[0], _same) if rows else None


def session_from_json(row: dict[str, Any]) -> Session:
    """A session from the ``row`` of a change notification (``row_to_json``)."""

    def time(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    return sql.session_from_row([row[name] for name in sql.SESSION_COLUMNS], time)


def keepalive_settings(idle: int = KEEPALIVE_IDLE) -> dict[str, str]:
    """The server side of the keepalives: PostgreSQL probes the connection too,
    and drops one whose data goes unacknowledged as long (``tcp_user_timeout``)."""
    return {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
        "tcp_user_timeout": str(_dead_after(idle) * 1000),
    }


async def keep_alive(connection: asyncpg.Connection, *, idle: int = KEEPALIVE_IDLE) -> None:
    """The client side: this host's kernel probes the connection, and gives up on
    unacknowledged data as soon. asyncpg has no option for it, so its socket is set here
    (as asyncpg's own maintainers suggest: MagicStack/asyncpg#606)."""
    transport = getattr(connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: no network between the node and its database
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _dead_after(idle) * 1000)


def _dead_after(idle: int) -> int:
    """Seconds after which a connection that stopped answering is given up."""
    return idle + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT


def stall_settings(limit: float) -> dict[str, str]:
    """The server settings that end a transaction stalled for ``limit`` seconds."""
    milliseconds = str(max(1, round(limit * 1000)))
    return {"idle_in_transaction_session_timeout": milliseconds, "lock_timeout": milliseconds}


def server_settings(stall_limit: float, name: str = "session-manager") -> dict[str, str]:
    """Every connection's settings: durable commits, a name in the server's views,
    stalled transactions ended, keepalives."""
    return {
        "synchronous_commit": "on",
        "application_name": name,
        **stall_settings(stall_limit),
        **keepalive_settings(),
    }


async def connect(url: str, stall_limit: float = STALL_LIMIT) -> asyncpg.Connection:
    """A connection to the sessions' database with ``server_settings`` and keepalives."""
    connection = await asyncpg.connect(
        url,
        timeout=_CONNECT_TIMEOUT,
        command_timeout=_COMMAND_TIMEOUT,
        server_settings=server_settings(stall_limit),
    )
    await keep_alive(connection)
    return connection


class PostgreSQL:
    """The sessions' PostgreSQL database as the shared SQL's backend."""

    reads_apart = True

    def __init__(self, url: str, node_id: str, stall_limit: float) -> None:
        self.url = url
        self.node_id = node_id
        self.stall_limit = stall_limit
        #: Fault points (tests): a commit may fail, or its acknowledgement be lost.
        self.faults = FaultPoints()
        self._db: asyncpg.Connection | None = None
        #: The writer's backend on the server, (pid, backend_start): ended on reconnect.
        self._backend: tuple[int, datetime] | None = None
        #: Connections for single reads (GetSession on any node), opened as needed.
        self._readers = asyncpg.create_pool(
            url,
            min_size=0,
            max_size=4,
            timeout=_CONNECT_TIMEOUT,
            command_timeout=_COMMAND_TIMEOUT,
            server_settings=server_settings(stall_limit),
            init=keep_alive,
        )

    async def open(self) -> None:
        """Connect, take the node's lock, and migrate the schema to this release's."""
        db = await connect(self.url, self.stall_limit)
        try:
            await self._take_lock(db)
            await _migrate(db)
            self._backend = await _backend_of(db)
        except BaseException:
            db.terminate()
            raise
        self._db = db
        # The readers' idle connections went through whatever cut the writer's off: they
        # are replaced as they are next taken, rather than each hanging for a timeout.
        await self._readers.expire_connections()
        await self._readers  # min_size 0: opens nothing yet

    async def close(self) -> None:
        self._readers.terminate()
        if self._db is not None:
            with contextlib.suppress(asyncpg.PostgresError, *CONNECTION_ERRORS):
                await self._db.close(timeout=_CONNECT_TIMEOUT)
            self._db.terminate()

    # One transaction.

    async def transaction(self, operations: list[Operation[Any]]) -> list[Any]:
        db = await self._writer()
        connection = Connection(db)
        transaction = db.transaction()
        try:
            await transaction.start()
            results = [await operation(connection) for operation in operations]
            xid: str | None = await db.fetchval("SELECT pg_current_xact_id_if_assigned()::text")
            self.faults.hit("commit")
        except BaseException as error:
            if _lost_connection(error, db):  # COMMIT was never sent: nothing is stored
                self._give_up(db)
                raise DatabaseUnreachable(self._lost(error)) from error
            if isinstance(error, asyncpg.ReadOnlySQLTransactionError):
                # A standby, or a read-only default: a new connection may reach a primary.
                self._give_up(db)
                raise
            with contextlib.suppress(asyncpg.PostgresError, *CONNECTION_ERRORS):
                await transaction.rollback()
            raise
        try:
            await transaction.commit()
            self.faults.hit("commit.acknowledged")  # tests: the answer to COMMIT is lost
        except BaseException as error:
            if not _lost_connection(error, db):
                raise
            self._give_up(db)
            # A transaction without an id wrote nothing: whatever became of it, its reads stand.
            if xid is not None and not await self._settle(xid, error):
                raise DatabaseUnreachable(self._lost(error) + "; nothing was stored") from error
        return results

    def retry_alone(self, error: Exception) -> bool:
        """A group that failed because the database is gone is not run again one by one."""
        return not isinstance(error, DatabaseUnreachable | DatabaseInUse)

    async def _writer(self) -> asyncpg.Connection:
        if self._db is None or self._db.is_closed():
            await self._reconnect()
        assert self._db is not None
        return self._db

    def _give_up(self, db: asyncpg.Connection) -> None:
        """Drop a connection that failed (or stalled): the next transaction connects anew."""
        db.terminate()

    def _lost(self, error: BaseException) -> str:
        return f"lost the connection to {display(self.url)}: {_describe(error)}"

    async def _settle(self, xid: str, error: BaseException) -> bool:
        """Whether the transaction ``xid``, whose COMMIT got no answer, was committed."""
        try:
            async with asyncio.timeout(SETTLE_WITHIN):
                self.faults.hit("settle")
                await self._reconnect()  # its old backend is ended first: xid runs no more
                assert self._db is not None
                status = await self._db.fetchval("SELECT pg_xact_status($1::text::xid8)", xid)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError, DatabaseUnreachable) as failure:
            if self._db is not None:  # a query cut short by the timeout leaves it unusable
                self._give_up(self._db)
            raise CommitUnknown(
                f"{self._lost(error)}; whether its last commit landed is not known yet "
                f"({_describe(failure)})"
            ) from error
        log.warning("a commit whose answer was lost is settled: %s (transaction %s)", status, xid)
        if status == "committed":
            return True
        if status == "aborted" or status is None:
            return False
        raise CommitUnknown(f"{self._lost(error)}; its last commit is still {status}")

    async def _reconnect(self) -> None:
        """Connect again, end this writer's old backend, then take the node's lock again."""
        log.warning("reconnecting to the database %s", display(self.url))
        try:
            db = await connect(self.url, self.stall_limit)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            raise DatabaseUnreachable(
                f"cannot reach {display(self.url)}: {_describe(error)}"
            ) from error
        try:
            if self._backend is not None:
                await _end_backend(db, *self._backend)
            await self._take_lock(db)
            self._backend = await _backend_of(db)
        except BaseException as error:
            db.terminate()
            if isinstance(error, (*CONNECTION_ERRORS, asyncpg.PostgresError)):
                raise DatabaseUnreachable(
                    f"cannot reach {display(self.url)}: {_describe(error)}"
                ) from error
            raise
        self._db = db
        # The readers' idle connections went through whatever cut the writer's off: they
        # are replaced as they are next taken, rather than each hanging for a timeout.
        await self._readers.expire_connections()

    async def _take_lock(self, db: asyncpg.Connection) -> None:
        """Take the node's advisory lock; DatabaseInUse if another server holds it.

        This writer's own old backend is ended before (``_end_backend``), so
        the holder can only be another process.
        """
        if not await db.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(self.node_id)):
            raise DatabaseInUse(display(self.url), self.node_id)

    # Reads and the health probe.

    async def read(self, operation: Operation[T]) -> T:
        try:
            db = await self._readers.acquire(timeout=_CONNECT_TIMEOUT)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            raise DatabaseUnreachable(
                f"cannot reach {display(self.url)}: {_describe(error)}"
            ) from error
        try:
            return await operation(Connection(db))
        except CONNECTION_ERRORS as error:
            end_pooled(db)
            await self._readers.expire_connections()  # the others likely went the same way
            raise DatabaseUnreachable(self._lost(error)) from error
        finally:
            await self._readers.release(db)

    async def read_snapshot(self, operation: Operation[T]) -> T:
        """Run ``operation`` in a read-only REPEATABLE READ transaction: one snapshot."""

        async def in_snapshot(db: sql.Db) -> T:
            assert isinstance(db, Connection)
            async with db.raw.transaction(isolation="repeatable_read", readonly=True):
                return await operation(db)

        return await self.read(in_snapshot)

    async def probe(self, db: sql.Db) -> None:
        """Take a transaction id: its COMMIT then writes to the server's WAL."""
        await db.fetch("SELECT pg_current_xact_id()")


def _lost_connection(error: BaseException, db: asyncpg.Connection) -> bool:
    """Whether ``error`` means the connection is gone (or unusable), not a statement's failure."""
    return isinstance(error, CONNECTION_ERRORS) or db.is_closed()


async def _backend_of(db: asyncpg.Connection) -> tuple[int, datetime]:
    row = await db.fetchrow(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )
    assert row is not None
    return row["pid"], row["backend_start"]


async def _end_backend(db: asyncpg.Connection, pid: int, started: datetime) -> None:
    """End the backend ``pid`` (if it is still the one that started then); wait until it is gone."""
    ended = await db.fetchval(
        "SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity "
        "WHERE pid = $1 AND backend_start = $2",
        pid,
        started,
        int(_END_WAIT * 1000),
    )
    if ended:
        log.warning("ended this node's old database backend %d", pid)


class Store(sql.SqlStore):
    """One PostgreSQL database; every method is one operation, committed before it returns."""

    backend: PostgreSQL

    @classmethod
    async def open(
        cls,
        url: str,
        node_id: str,
        stall_limit: float = STALL_LIMIT,
        fence: sql.Fence | None = None,
    ) -> Store:
        """Connect, take the node's lock and migrate; a stalled transaction ends after
        ``stall_limit`` seconds."""
        backend = PostgreSQL(url, node_id, stall_limit)
        await backend.open()
        return cls(backend, fence)

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def node_id(self) -> str:
        return self.backend.node_id

    @property
    def stall_limit(self) -> float:
        return self.backend.stall_limit


#: Where every transaction that appended to the event log is announced, after its commit.
EVENTS_CHANNEL = "events_appended"

# Each entry migrates the schema from version N to N + 1 (table schema_version).
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE ll_whatsapp_qr_sessions (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        -- Byte order, as in SQLite: pages and their order do not depend on a locale.
        instance_id text COLLATE "C" NOT NULL UNIQUE
            CHECK (instance_id ~ '^{contract.INSTANCE_ID_PATTERN}$'),
        phone_number text,
        status text NOT NULL,
        qr_status text NOT NULL,
        qr_string text,
        qr_generated_at timestamptz,
        qr_expires_at timestamptz,
        connected_at timestamptz,
        disconnected_at timestamptz,
        last_error_code text,
        last_error_message text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        revision bigint NOT NULL,{sql.SESSION_CHECKS}
    );
    CREATE TABLE messages (
        id text PRIMARY KEY,
        session_id bigint NOT NULL
            REFERENCES ll_whatsapp_qr_sessions (id) ON DELETE CASCADE,
        idempotency_key text,
        request_digest text NOT NULL DEFAULT '',
        recipient text NOT NULL,
        text text NOT NULL,
        status text NOT NULL {sql.MESSAGE_STATUS_CHECK},
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
    # Several nodes over one database (docs/storage-and-nodes.md, Running several nodes):
    # who is alive, who owns which session, and a notification for every committed change.
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
    # A message keeps WhatsApp's receipts (its status may be delivered or read) and when it
    # last changed; every change appends to the event log (service.store.sql), and each
    # transaction that appends wakes the nodes that follow the log.
    f"""
    ALTER TABLE messages DROP CONSTRAINT messages_status_check;
    ALTER TABLE messages ADD CONSTRAINT messages_status_check {sql.MESSAGE_STATUS_CHECK};
    ALTER TABLE messages ADD COLUMN updated_at timestamptz,
        ADD COLUMN delivered_at timestamptz, ADD COLUMN read_at timestamptz;
    UPDATE messages SET updated_at = coalesce(finished_at, accepted_at);
    ALTER TABLE messages ALTER COLUMN updated_at SET NOT NULL;
    CREATE INDEX messages_by_whatsapp_id ON messages (session_id, whatsapp_message_id);
    CREATE TABLE events (
        sequence bigint PRIMARY KEY,
        id text NOT NULL,
        type text NOT NULL {sql.EVENT_TYPE_CHECK},
        occurred_at timestamptz NOT NULL,
        instance_id text COLLATE "C" NOT NULL,
        session_id bigint NOT NULL,
        status text,
        previous_status text,
        data text NOT NULL
    );
    {sql.EVENT_LOG_TABLE}
    CREATE FUNCTION events_appended() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{EVENTS_CHANNEL}', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_appended AFTER INSERT ON events
        FOR EACH STATEMENT EXECUTE FUNCTION events_appended();
    """,
)
#: Where every committed change of a session is announced, in commit order
#: (payload: JSON with instance_id, id, revision, deleted, and the row itself
#: unless it would not fit: ``session_from_json``).
CHANGES_CHANNEL = "session_changes"
SCHEMA_VERSION = len(MIGRATIONS)


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
