"""Where each session incarnation's WhatsApp credentials live.

The server side (``Credentials``) makes a place for an incarnation before its
worker starts, hands the worker that place as one location string, wipes it on
logout, and forgets the places of sessions that are gone:

- ``DirectoryCredentials``: a folder per incarnation, ``<devices>/<id>-<instance_id>/``
  (one node, the default);
- ``PostgresCredentials``: a schema per incarnation, ``wa_device_<id>``, in the
  sessions' PostgreSQL database, so that a session that moves to another node
  reconnects there without a new QR code. Session ids are a PostgreSQL
  identity and never reused, so a schema never outlives its session's row into
  another session.

The worker side (``DeviceStore``, from ``device_store(location)``) reads that
location: whatsmeow keeps its own tables there (a SQLite file in the folder,
or its SQL store in the schema, selected by ``search_path``); the simulated
engine records the phone number of the device it paired.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from service.domain.states import SessionRef
from service.engine.port import EngineError

log = logging.getLogger(__name__)

#: The environment variable that gives a worker its credential location: a
#: URL may hold a password, which the command line would show to every user.
LOCATION_VARIABLE = "SESSION_MANAGER_WORKER_CREDENTIALS"
#: How long one credentials operation on PostgreSQL may take.
DATABASE_TIMEOUT = 30.0
#: How many schemas one ``DROP SCHEMA`` statement drops at the most.
DROP_BATCH = 16

SCHEMA_PREFIX = "wa_device_"
_SCHEMA = re.compile(rf"^{SCHEMA_PREFIX}(\d+)$")

T = TypeVar("T")


def is_database_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def schema_name(session_id: int) -> str:
    """The schema of one session incarnation's credentials."""
    return f"{SCHEMA_PREFIX}{session_id}"


def schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` selected, for a worker's drivers (asyncpg, whatsmeow's lib/pq).

    Both send ``search_path`` as a run-time parameter, so every table goes to the
    schema. Without an ``sslmode``, the one the server's store uses (asyncpg's
    and libpq's default, ``prefer``) is made explicit: lib/pq's own is ``require``.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(key, value) for key, value in query if key != "search_path"]
    if not any(key == "sslmode" for key, _ in query):
        query.append(("sslmode", "prefer"))
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def unavailable(error: BaseException) -> EngineError:
    return EngineError(
        "CREDENTIALS_UNAVAILABLE",
        f"the credentials database failed: {error or type(error).__name__}",
    )


async def on_database(url: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """``work`` on a connection of its own; a failure is ``CREDENTIALS_UNAVAILABLE``.

    Credentials are touched when a worker starts or a device is wiped, not on a
    hot path: a connection per operation needs no care for stale connections.
    """
    try:
        connection = await asyncpg.connect(url, timeout=DATABASE_TIMEOUT)
        try:
            return await asyncio.wait_for(work(connection), DATABASE_TIMEOUT)
        finally:
            await connection.close(timeout=DATABASE_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise unavailable(error) from error


# The server side.


class Credentials(Protocol):
    """The place of each session incarnation's credentials, seen from the server."""

    async def prepare(self, session: SessionRef) -> str:
        """Make the incarnation's place if it is missing; its location, for the worker."""

    async def wipe(self, session: SessionRef) -> None:
        """Forget the incarnation's credentials (logout, unlink, a new pairing)."""

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """Recovery at start-up: forget the credentials of sessions that are gone."""


class DirectoryCredentials:
    """A folder per incarnation under ``devices_dir``: one node's credentials."""

    def __init__(self, devices_dir: Path) -> None:
        self.devices_dir = devices_dir

    def folder(self, session: SessionRef) -> Path:
        return self.devices_dir / f"{session.id}-{session.instance_id}"

    async def prepare(self, session: SessionRef) -> str:
        folder = self.folder(session)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(folder)

    async def wipe(self, session: SessionRef) -> None:
        shutil.rmtree(self.folder(session), ignore_errors=True)

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """Remove every folder but those of ``kept``: this node is their only user."""
        keep = {self.folder(session).name for session in kept}
        if not self.devices_dir.is_dir():
            return
        for folder in self.devices_dir.iterdir():
            if folder.is_dir() and folder.name not in keep:
                log.info("removing credentials of a gone session: %s", folder.name)
                shutil.rmtree(folder, ignore_errors=True)


class PostgresCredentials:
    """A schema per incarnation in the sessions' database, shared by every node."""

    def __init__(self, url: str) -> None:
        self._url = url

    def location(self, session: SessionRef) -> str:
        return schema_url(self._url, schema_name(session.id))

    async def prepare(self, session: SessionRef) -> str:
        create = f'CREATE SCHEMA IF NOT EXISTS "{schema_name(session.id)}"'
        await on_database(self._url, lambda connection: connection.execute(create))
        return self.location(session)

    async def wipe(self, session: SessionRef) -> None:
        drop = f'DROP SCHEMA IF EXISTS "{schema_name(session.id)}" CASCADE'
        await on_database(self._url, lambda connection: connection.execute(drop))

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """Forget only deleted sessions' credentials, whatever ``kept`` says.

        Other nodes run beside this one: a session that is not in ``kept``
        (not paired when this node looked) may be pairing on another node right
        now, writing its schema.
        """
        await self.forget_deleted()

    async def forget_deleted(self) -> list[str]:
        """Drop the schemas of sessions whose row is gone; the names dropped.

        Safe while other nodes run: the schemas are listed first, the live ids
        read after. A schema is made only for a session whose row is already
        committed, so a schema in the list whose id is missing from the later
        read belongs to a deleted session, never to a live or a new one.
        """

        async def drop(connection: asyncpg.Connection) -> list[str]:
            schemas = await connection.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", SCHEMA_PREFIX + "%"
            )
            ids = {
                int(match.group(1)): match.group(0)
                for row in schemas
                if (match := _SCHEMA.match(row["nspname"]))
            }
            live = await connection.fetch(
                "SELECT id FROM ll_whatsapp_qr_sessions WHERE id = ANY($1::bigint[])", list(ids)
            )
            gone = sorted(ids[i] for i in set(ids) - {row["id"] for row in live})
            # A few schemas per statement: each dropped table, index and sequence
            # takes a lock, and a transaction's locks are bounded by the server.
            for start in range(0, len(gone), DROP_BATCH):
                batch = ", ".join(f'"{name}"' for name in gone[start : start + DROP_BATCH])
                await connection.execute(f"DROP SCHEMA IF EXISTS {batch} CASCADE")
            return gone

        gone = await on_database(self._url, drop)
        for name in gone:
            log.info("removed credentials of a deleted session: %s", name)
        return gone


# The worker side.


class DeviceStore(Protocol):
    """One incarnation's credential location, seen from its worker."""

    #: What whatsmeow's ``NewClient`` takes: a SQLite file or a PostgreSQL URL.
    whatsmeow_database: str

    async def holds_whatsmeow_device(self) -> bool:
        """Whether whatsmeow stored a paired device here."""

    async def read_phone(self) -> str | None:
        """The simulated engine's recorded device (its phone number), if any."""

    async def write_phone(self, phone_number: str) -> None:
        """Record the simulated engine's paired device."""


def device_store(location: str) -> DeviceStore:
    """The worker's view of the location the server gave it."""
    if is_database_url(location):
        return DeviceSchema(location)
    return DeviceFolder(Path(location))


class DeviceFolder:
    """Credentials in a folder: whatsmeow's SQLite file, the simulated ``device.json``."""

    WHATSMEOW_FILE = "device.db"
    SIMULATED_FILE = "device.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.whatsmeow_database = str(folder / self.WHATSMEOW_FILE)

    async def holds_whatsmeow_device(self) -> bool:
        return (self.folder / self.WHATSMEOW_FILE).exists()

    async def read_phone(self) -> str | None:
        try:
            record = json.loads((self.folder / self.SIMULATED_FILE).read_text())
        except FileNotFoundError:
            return None
        return str(record["phone_number"])

    async def write_phone(self, phone_number: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = self.folder / self.SIMULATED_FILE
        partial = record.with_suffix(".tmp")
        partial.write_text(json.dumps({"phone_number": phone_number}))
        partial.replace(record)


class DeviceSchema:
    """Credentials in a PostgreSQL schema: whatsmeow's tables, the simulated ``device``."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.whatsmeow_database = url

    async def holds_whatsmeow_device(self) -> bool:
        async def holds(connection: asyncpg.Connection) -> bool:
            if await connection.fetchval("SELECT to_regclass('whatsmeow_device')") is None:
                return False
            return bool(await connection.fetchval("SELECT EXISTS (SELECT FROM whatsmeow_device)"))

        return await on_database(self._url, holds)

    async def read_phone(self) -> str | None:
        async def read(connection: asyncpg.Connection) -> str | None:
            if await connection.fetchval("SELECT to_regclass('device')") is None:
                return None
            phone: str | None = await connection.fetchval("SELECT phone_number FROM device")
            return phone

        return await on_database(self._url, read)

    async def write_phone(self, phone_number: str) -> None:
        async def write(connection: asyncpg.Connection) -> None:
            async with connection.transaction():
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS device (phone_number text NOT NULL)"
                )
                await connection.execute("DELETE FROM device")
                await connection.execute("INSERT INTO device VALUES ($1)", phone_number)

        await on_database(self._url, write)
