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

With several nodes the credentials are fenced by the lease's epoch, so that
two workers never write one session's credentials: before a new owner's
worker starts, the schema is renamed to that owner's epoch
(``wa_device_<id>_e<epoch>``) and every connection of an older owner's worker
is ended. A worker's connections name the schema as their ``search_path`` and
say whose they are in their ``application_name`` (``sm-worker wa_device_<id>
epoch <epoch>``):
an older worker that reconnects finds no schema of that name, so it can
neither read nor write (nor create) a credential table; one that was in the
middle of a transaction is terminated, and the new owner's worker starts only
once it is gone.

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
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

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
_SCHEMA = re.compile(rf"^{SCHEMA_PREFIX}(\d+)(?:_e(\d+))?$")
#: How a worker's credential connections introduce themselves (``application_name``).
TAG_PREFIX = "sm-worker "
_TAG = re.compile(rf"^{TAG_PREFIX}{SCHEMA_PREFIX}(\d+)(?: epoch (\d+))?$")
#: How often the end of a stale worker's connections is checked, while waiting for it.
POLL_INTERVAL = 0.05
#: The first key of the advisory locks that serialize the fencing of one session's schema.
LOCK_CLASS = 0x5743

T = TypeVar("T")


def is_database_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def schema_name(session_id: int, epoch: int | None = None) -> str:
    """The schema of one session incarnation's credentials, under the lease ``epoch``.

    Without an epoch (no leases: one node) the name carries none.
    """
    base = f"{SCHEMA_PREFIX}{session_id}"
    return f"{base}_e{epoch}" if epoch else base


def parse_schema(name: str) -> tuple[int, int] | None:
    """The session id and epoch (0: none) a credentials schema is named for, if it is one."""
    match = _SCHEMA.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def worker_tag(session_id: int, epoch: int | None = None) -> str:
    """The ``application_name`` of a worker's credential connections: the incarnation's
    schema and the lease epoch it runs under (well within PostgreSQL's 63 bytes)."""
    tag = f"{TAG_PREFIX}{schema_name(session_id)}"
    return f"{tag} epoch {epoch}" if epoch else tag


def parse_tag(application_name: str) -> tuple[int, int] | None:
    """The session id and epoch (0: none) a worker's connection names, if it is one."""
    match = _TAG.match(application_name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def schema_url(url: str, schema: str, tag: str) -> str:
    """``url`` with ``schema`` selected, for a worker's drivers (asyncpg, whatsmeow's lib/pq).

    Both send ``search_path`` and ``application_name`` as run-time parameters
    (lib/pq passes on every parameter it does not know itself), so every table
    goes to the schema and every connection says whose it is (``tag``).
    Without an ``sslmode``, the one the server's store uses (asyncpg's and
    libpq's default, ``prefer``) is made explicit: lib/pq's own is ``require``.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(key, value) for key, value in query if key not in ("search_path", "application_name")]
    if not any(key == "sslmode" for key, _ in query):
        query.append(("sslmode", "prefer"))
    query.append(("search_path", schema))
    query.append(("application_name", tag))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


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
    """The place of each session incarnation's credentials, seen from the server.

    ``epoch`` is the epoch of the lease under which the node acts, or None
    where there are no leases (one node).
    """

    async def prepare(self, session: SessionRef, epoch: int | None = None) -> str:
        """Make the incarnation's place this epoch's; its location, for the worker.

        Once it returns, no worker of an older epoch can write there any more;
        raises EngineError ``CREDENTIALS_FENCED`` if a newer epoch holds it.
        """

    async def wipe(self, session: SessionRef, epoch: int | None = None) -> None:
        """Forget the incarnation's credentials (logout, unlink, a new pairing),
        unless a newer epoch holds them."""

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """Recovery at start-up: forget the credentials of sessions that are gone."""


class DirectoryCredentials:
    """A folder per incarnation under ``devices_dir``: one node's credentials."""

    def __init__(self, devices_dir: Path) -> None:
        self.devices_dir = devices_dir

    def folder(self, session: SessionRef) -> Path:
        return self.devices_dir / f"{session.id}-{session.instance_id}"

    async def prepare(self, session: SessionRef, epoch: int | None = None) -> str:
        """The folder, made if missing; one node uses it, so no epoch fences it."""
        folder = self.folder(session)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(folder)

    async def wipe(self, session: SessionRef, epoch: int | None = None) -> None:
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

    def location(self, session: SessionRef, epoch: int | None = None) -> str:
        return schema_url(self._url, schema_name(session.id, epoch), worker_tag(session.id, epoch))

    async def prepare(self, session: SessionRef, epoch: int | None = None) -> str:
        """Make the schema this epoch's, then end every older worker's connection to it.

        The schema is created, or renamed from the older epoch's name: an older
        worker's connections then find nothing under the name they use. Those
        still open are terminated, and the location is returned only once they
        are gone, so that none of their transactions can commit after the new
        worker starts.
        """
        target = schema_name(session.id, epoch)

        async def claim(connection: asyncpg.Connection) -> None:
            async with connection.transaction():
                held = await _lock_schemas(connection, session)
                newest = max(held, key=lambda name: held[name], default=None)
                if newest is not None and held[newest] > (epoch or 0):
                    raise _fenced(session, held[newest])
                if newest is None:
                    await connection.execute(f'CREATE SCHEMA "{target}"')
                elif newest != target:
                    await connection.execute(f'ALTER SCHEMA "{newest}" RENAME TO "{target}"')
                    log.info(
                        "credentials fenced for epoch %d (were %s)",
                        epoch or 0,
                        newest,
                        extra={"instance_id": session.instance_id},
                    )
            await _end_connections(connection, session, epoch)

        await on_database(self._url, claim)
        return self.location(session, epoch)

    async def wipe(self, session: SessionRef, epoch: int | None = None) -> None:
        """Drop the incarnation's schema, unless a newer epoch holds it (then it is kept)."""

        async def drop(connection: asyncpg.Connection) -> None:
            await _end_connections(connection, session, epoch)
            async with connection.transaction():
                held = await _lock_schemas(connection, session)
                mine = [name for name, held_by in held.items() if held_by <= (epoch or held_by)]
                if len(mine) < len(held):
                    log.warning(
                        "kept the credentials: a newer owner holds them",
                        extra={"instance_id": session.instance_id},
                    )
                if mine:
                    names = ", ".join(f'"{name}"' for name in mine)
                    await connection.execute(f"DROP SCHEMA IF EXISTS {names} CASCADE")

        await on_database(self._url, drop)

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
            ids: dict[int, list[str]] = {}
            for row in schemas:
                if (parsed := parse_schema(row["nspname"])) is not None:
                    ids.setdefault(parsed[0], []).append(row["nspname"])
            live = await connection.fetch(
                "SELECT id FROM ll_whatsapp_qr_sessions WHERE id = ANY($1::bigint[])", list(ids)
            )
            gone = sorted(name for i in set(ids) - {row["id"] for row in live} for name in ids[i])
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


def _fenced(session: SessionRef, epoch: int) -> EngineError:
    return EngineError(
        "CREDENTIALS_FENCED",
        f"a newer owner (lease epoch {epoch}) holds the credentials of session "
        f"{session.instance_id!r}; this node no longer owns it",
    )


async def _lock_schemas(connection: asyncpg.Connection, session: SessionRef) -> dict[str, int]:
    """Lock the fencing of the incarnation's schemas for this transaction; each one's epoch."""
    await connection.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_CLASS, schema_name(session.id)
    )
    rows = await connection.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname = $1 OR starts_with(nspname, $2)",
        schema_name(session.id),
        schema_name(session.id) + "_e",
    )
    held = {}
    for row in rows:
        parsed = parse_schema(row["nspname"])
        if parsed is not None and parsed[0] == session.id:
            held[row["nspname"]] = parsed[1]
    return held


async def _end_connections(
    connection: asyncpg.Connection, session: SessionRef, epoch: int | None
) -> None:
    """Terminate the incarnation's worker connections of ``epoch`` or older; wait until gone.

    Without an epoch, every one of them. The server runs no worker of the
    session while it calls this, so any such connection is a stale worker's.
    """
    rows = await connection.fetch(  # this database's only: another may hold the same ids
        "SELECT pid, application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND starts_with(application_name, $1) "
        "AND pid <> pg_backend_pid()",
        worker_tag(session.id),
    )
    stale = []
    for row in rows:
        parsed = parse_tag(row["application_name"])
        if parsed is not None and parsed[0] == session.id and parsed[1] <= (epoch or parsed[1]):
            stale.append(row["pid"])
    if not stale:
        return
    await connection.execute(
        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", stale
    )
    # Polled: PostgreSQL 13 has no wait for a backend's end (on_database bounds it).
    while await connection.fetchval(  # noqa: ASYNC110 - the database has no such event
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", stale
    ):
        await asyncio.sleep(POLL_INTERVAL)
    log.info(
        "ended %d credential connections of an older owner",
        len(stale),
        extra={"instance_id": session.instance_id},
    )


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
