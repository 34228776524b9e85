"""Why the server could not start, in one line an operator can act on.

Each failure an operator can meet before the server serves has its own exit
code (README, Operations); ``session-manager`` prints the message on one line
and exits with that code, never with a traceback.
"""

from __future__ import annotations

import enum
import errno
import socket
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import asyncpg

from service.config import PostgresURL, Settings
from service.store import failures, postgres
from service.store.port import SchemaTooNew


class ExitCode(enum.IntEnum):
    """The exit status of ``session-manager serve`` for each start-up failure."""

    UNEXPECTED = 1
    BAD_SETTING = 2
    INSECURE_ADDRESS = 3
    FILE_UNREADABLE = 4
    TLS_KEY_MISMATCH = 5
    DATABASE_IN_USE = 6
    DATABASE_CORRUPT = 7
    SCHEMA_TOO_NEW = 8
    DATABASE_NOT_WRITABLE = 9
    DATABASE_UNAVAILABLE = 10
    ADDRESS_IN_USE = 11
    ADDRESS_UNUSABLE = 12
    METRICS_ADDRESS = 13


class StartupError(RuntimeError):
    """A reason the server cannot start; ``str()`` is the one line to show."""

    def __init__(self, exit_code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a file the settings name, or the StartupError that says why not."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise StartupError(
            ExitCode.FILE_UNREADABLE, f"cannot read the {what} {path}: {error.strerror}"
        ) from error


def check_tls_pair(settings: Settings) -> None:
    """Refuse a certificate and key that cannot be read or do not belong together.

    gRPC would only say "Failed to bind" later; this names the files.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return
    read_file(settings.tls_cert, "TLS certificate (--tls-cert)")
    read_file(settings.tls_key, "TLS key (--tls-key)")
    if settings.tls_client_ca is not None:
        read_file(settings.tls_client_ca, "TLS client CA (--tls-client-ca)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, ValueError) as error:
        raise StartupError(
            ExitCode.TLS_KEY_MISMATCH,
            f"the TLS key {settings.tls_key} does not match the certificate {settings.tls_cert}, "
            f"or one of them is not PEM ({getattr(error, 'reason', None) or error})",
        ) from error


def split_address(address: str) -> tuple[str, int]:
    """``host`` and ``port`` of ``host:port`` or ``[v6]:port`` (already validated)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_address(address: str, what: str, exit_code: ExitCode | None = None) -> None:
    """Refuse an address this host cannot listen on, or one another process listens on.

    A trial bind on each address the host resolves to says why before gRPC
    tries (gRPC only says "Failed to bind", and on a line of its own). Like
    gRPC, one usable address is enough; one in use is not, since another
    server is there. ``exit_code`` replaces both address codes.
    """
    host, port = split_address(address)
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise StartupError(
            exit_code or ExitCode.ADDRESS_UNUSABLE,
            f"cannot listen on {address} ({what}): {error.strerror}",
        ) from None
    problems = [
        _trial_bind(family, kind, proto, sockaddr) for family, kind, proto, _, sockaddr in resolved
    ]
    if any(problem is not None and problem.errno == errno.EADDRINUSE for problem in problems):
        raise StartupError(
            exit_code or ExitCode.ADDRESS_IN_USE,
            f"cannot listen on {address} ({what}): another process listens on that port",
        )
    failed = [problem for problem in problems if problem is not None]
    if len(failed) == len(problems):  # not one of its addresses can be bound here
        raise StartupError(
            exit_code or ExitCode.ADDRESS_UNUSABLE,
            f"cannot listen on {address} ({what}): {failed[0].strerror}",
        )


def _trial_bind(family: int, kind: int, proto: int, sockaddr: Any) -> OSError | None:
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        try:
            probe.bind(sockaddr)
        except OSError as error:
            return error
    return None


def database_failure(database: Path | PostgresURL, error: BaseException) -> StartupError | None:
    """Why the database could not be opened, or None when ``error`` is not about the database."""
    shown = postgres.display(database) if isinstance(database, PostgresURL) else str(database)
    if isinstance(error, SchemaTooNew):
        return StartupError(
            ExitCode.SCHEMA_TOO_NEW,
            f"the database {shown} was written by a newer release ({error}); "
            "run that release or restore a backup",
        )
    if isinstance(database, PostgresURL):
        return _postgres_failure(shown, error)
    if isinstance(error, OSError):
        return StartupError(
            ExitCode.DATABASE_NOT_WRITABLE,
            f"cannot create the database {database}: {error.strerror}",
        )
    if getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CANTOPEN:
        return StartupError(
            ExitCode.DATABASE_NOT_WRITABLE,
            f"cannot open the database {database}; check the path and the permissions "
            "of the file and its directory",
        )
    return _classified(shown, error)


_REFUSED_BY_THE_SERVER = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


def _postgres_failure(shown: str, error: BaseException) -> StartupError | None:
    if isinstance(error, failures.DatabaseInUse):
        return StartupError(ExitCode.DATABASE_IN_USE, str(error))
    if isinstance(error, OSError):  # refused, no such host, no answer in time
        return StartupError(
            ExitCode.DATABASE_UNAVAILABLE,
            f"cannot reach the database {shown}: {error.strerror or error or 'no answer'}",
        )
    if isinstance(
        error, asyncpg.InvalidCatalogNameError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        # No such database, no such role, a wrong password: the server's words say which.
        return StartupError(
            ExitCode.DATABASE_UNAVAILABLE, f"cannot open the database {shown}: {error}"
        )
    return _classified(shown, error)


def _classified(shown: str, error: BaseException) -> StartupError | None:
    cause = failures.cause_of(error)
    if cause is None:
        return None
    code, text = _DATABASE_CAUSES[cause]
    return StartupError(code, f"the database {shown} {text} ({error})")


_DATABASE_CAUSES = {
    failures.Cause.CORRUPT: (
        ExitCode.DATABASE_CORRUPT,
        "is corrupt or not a database; restore a backup (README, Operations)",
    ),
    failures.Cause.READ_ONLY: (
        ExitCode.DATABASE_NOT_WRITABLE,
        "cannot be written; check the permissions of the file and its directory",
    ),
    failures.Cause.DISK_FULL: (ExitCode.DATABASE_UNAVAILABLE, "cannot grow: the disk is full"),
    failures.Cause.LOCKED: (ExitCode.DATABASE_UNAVAILABLE, "is locked by another process"),
    failures.Cause.UNREACHABLE: (
        ExitCode.DATABASE_UNAVAILABLE,
        "cannot be reached; check the URL, the server and the network",
    ),
    failures.Cause.IO_ERROR: (
        ExitCode.DATABASE_UNAVAILABLE,
        "cannot be opened or read; check the path, its permissions and the disk",
    ),
}
