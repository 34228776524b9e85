"""SQLite failures an operator can act on, named by their cause.

A caller whose change could not be stored gets STORAGE_UNAVAILABLE with
``metadata.cause`` (``disk_full``, ``locked``, ``corrupt``, ``read_only``,
``io_error``) instead of an anonymous internal error; nothing was changed.
Failures that are the caller's (a constraint) or the code's pass unchanged.
"""

from __future__ import annotations

import enum
import sqlite3

import aiosqlite

from service.domain.errors import ContractError
from sessionmanager.v1 import session_pb2


class Cause(enum.StrEnum):
    DISK_FULL = "disk_full"
    LOCKED = "locked"
    CORRUPT = "corrupt"
    READ_ONLY = "read_only"
    IO_ERROR = "io_error"


#: What each cause means, for the error's message.
_MEANING = {
    Cause.DISK_FULL: "the disk is full",
    Cause.LOCKED: "the database is locked by another process",
    Cause.CORRUPT: "the database file is corrupt",
    Cause.READ_ONLY: "the database is read-only",
    Cause.IO_ERROR: "the disk failed to read or write",
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


def cause_of(error: BaseException) -> Cause | None:
    """The cause of a storage failure, or None when the error is not one."""
    if not isinstance(error, sqlite3.Error):
        return None
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        return None
    return _BY_CODE.get(code & 0xFF)


def storage_unavailable(cause: Cause, detail: str) -> ContractError:
    return ContractError(
        session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE,
        f"the database is unavailable: {_MEANING[cause]} ({detail}); nothing was changed",
        cause=cause.value,
    )


def for_caller(error: Exception) -> Exception:
    """What a caller gets for ``error``: a storage failure's contract error, else ``error``."""
    cause = cause_of(error)
    return error if cause is None else storage_unavailable(cause, str(error))


class IntegrityCheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` found the file damaged."""

    sqlite_errorcode = sqlite3.SQLITE_CORRUPT


async def quick_check(db: aiosqlite.Connection) -> None:
    """Refuse a damaged file at open, before anything is served from it.

    ``quick_check`` reads every page but skips the index cross-checks of
    ``integrity_check``: O(N), a fraction of a second for a large store.
    """
    rows = [str(row[0]) for row in await db.execute_fetchall("PRAGMA quick_check")]
    if rows != ["ok"]:
        raise IntegrityCheckFailed("quick_check: " + "; ".join(rows[:3]))
