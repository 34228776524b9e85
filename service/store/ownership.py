"""One server per database file: an exclusive lock held for the life of the process.

Two servers on one file would each believe their own memory and answer the
same question differently. The owner holds ``fcntl.flock`` on ``<database>.lock``
beside the file, from before the store opens until it stops; the kernel drops
the lock when the process ends in any way, SIGKILL included, so a crash never
leaves a stale lock behind. The lock file also says who holds it (pid and
address), for the message a second server prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class NotWritable(OSError):
    """The database's directory or its lock file cannot be created."""


class InUse(RuntimeError):
    """Another server holds the database."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


class Ownership:
    """The held lock on one database file; ``release`` (or the process's end) gives it up."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def acquire(cls, database: Path) -> Ownership:
        """Take the database; ``NotWritable`` or ``InUse``, naming the file and its holder."""
        path = lock_path(database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = "a file is in the way" if path.parent.exists() else error.strerror
            raise NotWritable(
                f"cannot create the database directory {path.parent}: {problem}"
            ) from error
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise NotWritable(
                f"cannot create the lock file {path} beside the database: {error.strerror}"
            ) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(descriptor) or "another process"
            os.close(descriptor)
            raise InUse(
                f"the database {database} is in use by another server ({holder}); "
                "one server per database file"
            ) from None
        ownership = cls(path, descriptor)
        ownership.record()
        return ownership

    def record(self, address: str = "") -> None:
        """Write who holds the lock: this pid, and once it listens, its address."""
        if self._descriptor is None:
            return
        holder = f"pid {os.getpid()}" + (f", listening on {address}" if address else "")
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, holder.encode(), 0)

    def release(self) -> None:
        """Give up the database; the lock file stays, empty, for the next owner."""
        if self._descriptor is None:
            return
        os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)  # closing the only descriptor releases the flock
        self._descriptor = None


def _read(descriptor: int) -> str:
    return os.pread(descriptor, 200, 0).decode(errors="replace").strip()
