"""Database failures an operator can act on, named by their cause.

The stores hand their driver's exceptions up unchanged (SQLite's, or
asyncpg's and the ones below), so that the domain's own refusals (contract
errors) stay apart from the infrastructure failing. Where a call ends, the API
turns a storage failure into STORAGE_UNAVAILABLE with ``metadata.cause``
(``disk_full``, ``locked``, ``corrupt``, ``read_only``, ``io_error``,
``unreachable``) and ``metadata.commit``: ``none`` when nothing was stored, or
``unknown`` when a commit's acknowledgement was lost and it could not be
settled in time (``CommitUnknown``). At start-up, ``service.startup`` turns a
storage failure into one line and an exit code. Failures that are not the
storage's (a constraint, a bug) are not classified.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3

import aiosqlite
import asyncpg

from service.domain.errors import ContractError
from sessionmanager.v1 import session_pb2


class DatabaseUnreachable(ConnectionError):
    """The server cannot be reached, did not answer in time, or ended the connection.

    Raised only where nothing was committed: a commit whose acknowledgement
    was lost is settled first (``CommitUnknown`` when it cannot be).
    """


class CommitUnknown(DatabaseUnreachable):
    """A commit's acknowledgement was lost and whether it landed could not be found out in time.

    The sessions it touched are re-read before anything else is done with them.
    """

    def __init__(self, message: str, instance_ids: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        #: The sessions the transaction wrote.
        self.instance_ids = instance_ids


class DatabaseInUse(RuntimeError):
    """Another server runs as the same node on this database."""

    def __init__(self, shown_url: str, node_id: str) -> None:
        super().__init__(
            f"the database {shown_url} is in use by another server as node {node_id!r}; "
            "give each node its own --node-id"
        )


class Cause(enum.StrEnum):
    DISK_FULL = "disk_full"
    LOCKED = "locked"
    CORRUPT = "corrupt"
    READ_ONLY = "read_only"
    IO_ERROR = "io_error"
    UNREACHABLE = "unreachable"


#: What each cause means, for the error's message.
_MEANING = {
    Cause.DISK_FULL: "the disk is full",
    Cause.LOCKED: "the database is locked by another process",
    Cause.CORRUPT: "the database file is corrupt",
    Cause.READ_ONLY: "the database is read-only",
    Cause.IO_ERROR: "the disk failed to read or write",
    Cause.UNREACHABLE: "the database server cannot be reached or ended the connection",
}

#: SQLite's primary result codes (the low byte of an extended code).
_BY_CODE = {
    sqlite3.SQLITE_FULL: Cause.DISK_FULL,
    sqlite3.SQLITE_BUSY: Cause.LOCKED,
    sqlite3.SQLITE_LOCKED: Cause.LOCKED,
    sqlite3.SQLITE_CORRUPT: Cause.CORRUPT,
    sqlite3.SQLITE_NOTADB: Cause.CORRUPT,
    sqlite3.SQLITE_READONLY: Cause.READ_ONLY,
    sqlite3.SQLITE_PERM: Cause.READ_ONLY,
    sqlite3.SQLITE_IOERR: Cause.IO_ERROR,
    sqlite3.SQLITE_CANTOPEN: Cause.IO_ERROR,
}


#: SQLite's messages, for errors raised without a result code.
_BY_MESSAGE = (
    ("database or disk is full", Cause.DISK_FULL),
    ("database is locked", Cause.LOCKED),
    ("database table is locked", Cause.LOCKED),
    ("file is not a database", Cause.CORRUPT),
    ("malformed", Cause.CORRUPT),
    ("readonly database", Cause.READ_ONLY),
    ("disk i/o error", Cause.IO_ERROR),
)


#: PostgreSQL's SQLSTATE codes, exact (five characters) or by class (two).
_BY_SQLSTATE = {
    "53100": Cause.DISK_FULL,  # disk_full
    "25006": Cause.READ_ONLY,  # read_only_sql_transaction: a standby, a read-only role
    "42501": Cause.READ_ONLY,  # insufficient_privilege
    "55P03": Cause.LOCKED,  # lock_not_available
    "40P01": Cause.LOCKED,  # deadlock_detected
    "XX001": Cause.CORRUPT,  # data_corrupted
    "XX002": Cause.CORRUPT,  # index_corrupted
    "58": Cause.IO_ERROR,  # system_error: io_error, undefined_file, ...
    "08": Cause.UNREACHABLE,  # connection_exception
    "57P01": Cause.UNREACHABLE,  # admin_shutdown
    "57P02": Cause.UNREACHABLE,  # crash_shutdown
    "57P03": Cause.UNREACHABLE,  # cannot_connect_now (starting up, recovering)
    "53300": Cause.UNREACHABLE,  # too_many_connections
}


def _postgres_cause(error: BaseException) -> Cause | None:
    if isinstance(error, DatabaseInUse):
        return Cause.LOCKED
    if isinstance(error, DatabaseUnreachable | asyncpg.ConnectionDoesNotExistError):
        return Cause.UNREACHABLE
    if isinstance(error, asyncpg.PostgresError):
        code = str(error.sqlstate or "")
        return _BY_SQLSTATE.get(code) or _BY_SQLSTATE.get(code[:2])
    return None


def cause_of(error: BaseException) -> Cause | None:
    """The cause of a storage failure, or None when the error is not one."""
    if not isinstance(error, sqlite3.Error):
        return _postgres_cause(error)
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return _BY_CODE.get(code & 0xFF)
    text = str(error).lower()
    return next((cause for words, cause in _BY_MESSAGE if words in text), None)


def storage_unavailable(error: BaseException) -> ContractError | None:
    """The contract error of a storage failure, or None when ``error`` is not one."""
    cause = cause_of(error)
    if cause is None:
        return None
    if isinstance(error, CommitUnknown):
        return ContractError(
            session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE,
            f"the database is unavailable: {_MEANING[cause]} ({error}); the change may or may "
            "not have been stored: the session is read again before its next change",
            cause=cause.value,
            commit="unknown",
        )
    return ContractError(
        session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE,
        f"the database is unavailable: {_MEANING[cause]} ({error}); nothing was stored",
        cause=cause.value,
        commit="none",
    )


class IntegrityCheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` found the file damaged."""

    sqlite_errorcode = sqlite3.SQLITE_CORRUPT


async def check_usable(db: aiosqlite.Connection) -> None:
    """Refuse, at open, a file that is damaged or cannot be written, before anything is served.

    ``quick_check`` reads every page but skips the index cross-checks of
    ``integrity_check``: O(N), a fraction of a second for a large store. The
    write probe stores the schema version it read, which changes nothing but
    needs the file, its journal and its directory to be writable.
    """
    rows = [str(row[0]) for row in await db.execute_fetchall("PRAGMA quick_check")]
    if rows != ["ok"]:
        raise IntegrityCheckFailed("quick_check: " + "; ".join(rows[:3]))
    version = int(next(iter(await db.execute_fetchall("PRAGMA user_version")))[0])
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute(f"PRAGMA user_version = {version}")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")
