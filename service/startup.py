"""Why the server could not start, in one line an operator can act on.

Each failure an operator can meet before the server serves has its own exit
code (docs/operations.md); ``session-manager`` prints the message on one line
and exits with that code, never with a traceback.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import math
import os
import resource
import socket
import sqlite3
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from service.config import PostgresURL, Settings
from service.store import failures, ownership, postgres
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


class InsecureAddress(StartupError):
    """A non-loopback address without tokens, not explicitly allowed, or with weak tokens."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.INSECURE_ADDRESS, message)


#: The strength a token must have when anything listens beyond loopback.
MIN_TOKEN_BITS = 128
# The smallest of these alphabets that holds every character of a token sets its bits per
# character: 32 hex digits or 22 URL-safe base64 characters make 128 bits.
_ALPHABETS = (
    (frozenset("0123456789"), 10),
    (frozenset("0123456789abcdef"), 16),
    (frozenset("0123456789ABCDEF"), 16),
    (frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/="), 64),
    (frozenset(chr(code) for code in range(0x20, 0x7F)), 95),
)


def token_bits(token: bytes) -> float:
    """An upper bound of the randomness a token can hold: its length times its alphabet's bits."""
    characters = set(token.decode("latin-1"))
    size = next((size for alphabet, size in _ALPHABETS if characters <= alphabet), 256)
    return len(token) * math.log2(size)


def loopback_only(address: str) -> bool:
    """Whether ``host:port`` listens on loopback alone, by the addresses its host resolves to.

    A name is resolved as the listener will resolve it, so ``127.0.0.1.example`` counts
    as what it points to, not as what it looks like; a name that does not resolve is
    not loopback.
    """
    host, port = split_address(address)
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return bool(resolved) and all(
            ipaddress.ip_address(sockaddr[0]).is_loopback for *_, sockaddr in resolved
        )
    except (OSError, UnicodeError, ValueError):
        return False


def check_exposure(
    addresses: Iterable[str], tokens: Iterable[tuple[str, bytes]], allow_no_tokens: bool
) -> None:
    """Refuse to listen beyond loopback without tokens, or with a token a guess could find.

    ``tokens`` are (role, token) pairs; ``allow_no_tokens`` is
    ``--allow-unauthenticated-remote``, which allows no tokens but never weak ones.
    """
    remote = [address for address in addresses if address and not loopback_only(address)]
    if not remote:
        return
    given = list(tokens)
    if not given and not allow_no_tokens:
        raise InsecureAddress(
            f"refusing to listen on {remote[0]} without tokens: set "
            "SESSION_MANAGER_PUBLIC_TOKEN and SESSION_MANAGER_INTERNAL_TOKEN (docs/security.md), "
            "or pass --allow-unauthenticated-remote if this is intended"
        )
    for role, token in given:
        bits = token_bits(token)
        if bits < MIN_TOKEN_BITS:
            raise InsecureAddress(
                f"refusing to listen on {remote[0]} with a {role} token of at most "
                f"{bits:.0f} bits: beyond loopback every token needs {MIN_TOKEN_BITS} "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )


@dataclass(frozen=True)
class FileLimit:
    """The process's open-file limits after start-up raised them, and the files open then."""

    soft: int
    hard: int
    was: int
    open_files: int

    @property
    def http_share(self) -> int:
        """The HTTP connections the process can afford: half of the descriptors still free.

        The other half stays for gRPC (Central Hub's path), the database, the engine
        workers' pipes and the metrics listener, whatever HTTP clients do.
        """
        return max(1, (self.soft - self.open_files) // 2)


def raise_file_limit() -> FileLimit:
    """Raise the soft limit of open files to the hard limit, as far as the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    was = soft
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):  # above the kernel's nr_open: keep what we have
            pass
    unlimited = 1 << 20  # what "unlimited" means in practice: Linux's default nr_open
    return FileLimit(
        soft=unlimited if soft == resource.RLIM_INFINITY else soft,
        hard=unlimited if hard == resource.RLIM_INFINITY else hard,
        was=unlimited if was == resource.RLIM_INFINITY else was,
        open_files=_open_files(),
    )


def _open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def http_connection_cap(files: FileLimit, wanted: int) -> int:
    """``--http-max-connections``, or its automatic value (0): never more than HTTP's share."""
    if wanted == 0:
        return files.http_share
    if wanted > files.http_share:
        raise StartupError(
            ExitCode.BAD_SETTING,
            f"--http-max-connections {wanted} is more than the {files.http_share} connections "
            f"half of the free file descriptors allow (limit {files.soft}, {files.open_files} "
            "in use): raise the hard limit (ulimit -Hn) or ask for fewer",
        )
    return wanted


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
    if isinstance(error, ownership.InUse):
        return StartupError(ExitCode.DATABASE_IN_USE, str(error))
    if isinstance(error, ownership.NotWritable):
        return StartupError(ExitCode.DATABASE_NOT_WRITABLE, str(error))
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
        "is corrupt or not a database; restore a backup (docs/operations.md)",
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
