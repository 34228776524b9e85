"""The engine's side of running several nodes: Hold, release, credentials in PostgreSQL.

Each test drives ``WorkerEngine`` directly, as a node's cluster layer does,
with simulated engines in real worker processes. Credentials live in a
throwaway PostgreSQL database (``postgres_url``) where a session moves between
nodes; two engines on one database stand for two nodes. A worker's lease
deadline (``hold``) is shown to end it by itself, also when its node is
frozen with SIGSTOP (``tests.lease_node`` runs such a node in a process), and
the lease's epoch fences the credentials: a worker of an older owner can no
longer write them once a newer owner's worker starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from service.clock import ManualClock, SystemClock, boottime
from service.domain import states
from service.domain.contract import LOGOUT
from service.domain.states import EngineEvent, SessionRef, new_session
from service.engine.credentials import (
    DROP_BATCH,
    LOCATION_VARIABLE,
    PostgresCredentials,
    schema_name,
    schema_url,
    worker_tag,
)
from service.engine.phone import WorkerPhone
from service.engine.port import EngineError
from service.engine.process import WorkerProcess
from service.engine.protocol import EXIT_LEASE_EXPIRED, Command
from service.engine.simulated import PairingTimes, SimulatedEngine
from service.engine.supervisor import WorkerEngine, WorkerOptions
from service.store import postgres
from tests.flows import PHONE, eventually
from tests.postgres import Cluster
from tests.processes import alive

RESTART_INITIAL = 0.2
#: How far ahead a node's lease loop holds its workers (a few renewals' worth).
LEASE = 2.0


@dataclass
class Reports:
    """A node's ``Report``: every event the engine reports, in order."""

    events: list[tuple[SessionRef, EngineEvent]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, session: SessionRef, event: EngineEvent) -> None:
        self.events.append((session, event))
        self._arrived.set()

    def of(self, kind: type[EngineEvent]) -> list[EngineEvent]:
        return [event for _, event in self.events if isinstance(event, kind)]

    async def until(self, kind: type[EngineEvent], within: float = 10.0) -> EngineEvent:
        """The first reported event of ``kind``, waiting for it if it has not come yet."""
        async with asyncio.timeout(within):
            while not (found := self.of(kind)):
                self._arrived.clear()
                await self._arrived.wait()
        return found[0]


@dataclass
class Node:
    engine: WorkerEngine
    reports: Reports
    phone: WorkerPhone


@dataclass
class Database:
    url: str
    store: postgres.Store

    async def create(self, instance_id: str) -> SessionRef:
        session_id = await self.store.insert_session(new_session(instance_id, SystemClock().now()))
        return SessionRef(instance_id, session_id)

    async def schemas(self) -> set[str]:
        connection = await asyncpg.connect(self.url)
        try:
            rows = await connection.fetch("SELECT nspname FROM pg_namespace")
        finally:
            await connection.close()
        return {row["nspname"] for row in rows}

    async def device(self, session: SessionRef, epoch: int) -> str | None:
        """The phone number the simulated engine recorded in the schema of ``epoch``."""
        connection = await asyncpg.connect(self.url)
        try:
            phone: str | None = await connection.fetchval(
                f'SELECT phone_number FROM "{schema_name(session.id, epoch)}".device'
            )
        finally:
            await connection.close()
        return phone


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[Database]:
    store = await postgres.Store.open(postgres_url, "n1")  # the sessions' table, migrated
    try:
        yield Database(postgres_url, store)
    finally:
        await store.close()


@pytest.fixture
async def nodes(database: Database) -> AsyncIterator[Callable[[], Node]]:
    """Makes nodes: engines of simulated workers over the one database's credentials."""
    started: list[Node] = []

    def node() -> Node:
        options = WorkerOptions(
            engine="simulated",
            credentials=PostgresCredentials(database.url),
            heartbeat_interval=60.0,
            restart_initial=RESTART_INITIAL,
        )
        reports = Reports()
        engine = WorkerEngine(options, reports, SystemClock())
        started.append(Node(engine, reports, WorkerPhone(engine)))
        return started[-1]

    try:
        yield node
    finally:
        for each in started:
            await each.engine.close()


async def paired(node: Node, session: SessionRef) -> int:
    """Pair and connect ``session`` on ``node``; its worker's pid."""
    await node.engine.start_pairing(session)
    await node.reports.until(states.QRShown)
    await node.phone.scan(session, PHONE, hold_handshake=False)
    connected = await node.reports.until(states.Connected)
    assert connected == states.Connected(PHONE)
    return node.engine.worker_pids()[session.instance_id]


async def test_a_session_moves_to_another_node_and_reconnects_without_a_qr(
    database: Database, nodes: Callable[[], Node]
) -> None:
    first, second = nodes(), nodes()
    session = await database.create("moving")
    old_pid = await paired(first, session)
    assert f"wa_device_{session.id}" in await database.schemas()
    reported = len(first.reports.events)

    await first.engine.release(session)
    assert not alive(old_pid)  # stopped before release returns
    assert first.engine.worker_pids() == {}
    assert len(first.reports.events) == reported  # a release reports nothing
    assert f"wa_device_{session.id}" in await database.schemas()  # credentials kept

    await second.engine.restore(session, None)
    assert await second.reports.until(states.Connected) == states.Connected(PHONE)
    assert second.reports.of(states.QRShown) == []  # no new QR code
    new_pid = second.engine.worker_pids()["moving"]
    assert new_pid != old_pid
    assert await second.engine.send(session, PHONE, "hola") != ""


async def test_a_session_without_stored_credentials_needs_a_new_qr(
    database: Database, nodes: Callable[[], Node]
) -> None:
    node = nodes()
    session = await database.create("never-paired")
    await node.engine.restore(session, PHONE)
    ended = await node.reports.until(states.Disconnected)
    assert isinstance(ended, states.Disconnected)
    assert ended.reason == LOGOUT
    assert "no stored device" in ended.message
    assert node.reports.of(states.Connected) == []


async def test_logout_drops_the_sessions_schema(
    database: Database, nodes: Callable[[], Node]
) -> None:
    node = nodes()
    session = await database.create("leaving")
    pid = await paired(node, session)
    await node.engine.logout(session)
    assert not alive(pid)
    assert f"wa_device_{session.id}" not in await database.schemas()


async def test_cleanup_keeps_live_sessions_credentials_and_drops_deleted_ones(
    database: Database,
) -> None:
    credentials = PostgresCredentials(database.url)
    live = await database.create("live")
    deleted = await database.create("deleted")
    await credentials.prepare(live, 2)  # each fenced by the epoch of the node that ran it
    await credentials.prepare(deleted, 3)
    await database.store.delete_session(deleted)
    # Sessions deleted long ago: more than one DROP statement takes.
    long_gone = {f"wa_device_{1000 + n}" for n in range(DROP_BATCH + 3)}
    other = await asyncpg.connect(database.url)
    try:
        await other.execute("CREATE SCHEMA wa_device_notes")  # not a credentials schema
        await other.execute(f"CREATE SCHEMA wa_device_{deleted.id}_old")  # nor is this one
        await other.execute(f"CREATE TABLE wa_device_{live.id}_e2.device (phone_number text)")
        for name in long_gone:
            await other.execute(f"CREATE SCHEMA {name}")
            await other.execute(f"CREATE TABLE {name}.device (phone_number text)")
    finally:
        await other.close()

    dropped = await credentials.forget_deleted()

    assert set(dropped) == {f"wa_device_{deleted.id}_e3", *long_gone}
    schemas = await database.schemas()
    assert f"wa_device_{live.id}_e2" in schemas
    assert not schemas & set(dropped)
    assert {"wa_device_notes", f"wa_device_{deleted.id}_old"} <= schemas
    assert await credentials.forget_deleted() == []  # nothing left to drop


async def test_a_worker_past_its_hold_ends_itself_and_is_not_restarted(
    database: Database, nodes: Callable[[], Node]
) -> None:
    node = nodes()
    session = await database.create("held")
    deadline = boottime() + LEASE
    node.engine.hold("held", deadline, 1)  # before the worker starts: its first command

    async def renew() -> None:  # the node's lease loop
        nonlocal deadline
        while True:
            deadline = boottime() + LEASE
            node.engine.hold("held", deadline, 1)
            await asyncio.sleep(0.2)

    renewing = asyncio.create_task(renew())
    try:
        first_deadline = deadline
        await paired(node, session)
        worker = node.engine.worker(session)
        assert worker is not None
        await asyncio.sleep(max(0.0, first_deadline + 0.5 - boottime()))
        assert worker.alive  # each Hold moved the deadline on
    finally:
        renewing.cancel()
    last_deadline = deadline
    reported = len(node.reports.events)

    returncode = await asyncio.wait_for(asyncio.shield(worker.exited), 10.0)
    assert returncode == EXIT_LEASE_EXPIRED
    assert boottime() >= last_deadline  # not before its time
    with pytest.raises(EngineError) as refused:
        await node.engine.start_pairing(session)
    assert refused.value.code == "LEASE_EXPIRED"
    with pytest.raises(EngineError):
        await node.engine.restore(session, PHONE)
    await asyncio.sleep(5 * RESTART_INITIAL)  # longer than a restart's backoff
    assert node.engine.worker_pids() == {}  # not restarted
    assert len(node.reports.events) == reported  # and nothing reported


async def test_a_worker_that_never_got_a_hold_has_no_deadline(
    database: Database, nodes: Callable[[], Node]
) -> None:
    node = nodes()
    session = await database.create("single")
    await paired(node, session)
    worker = node.engine.worker(session)
    assert worker is not None
    node.engine.hold("single", boottime() + 0.5, 1)
    node.engine.hold("single", math.inf, 1)  # lifted before it passed
    await asyncio.sleep(1.0)
    assert worker.alive
    assert await node.engine.send(session, PHONE, "hola") != ""


async def test_whatsmeow_keeps_its_store_in_the_sessions_schema(database: Database) -> None:
    options = WorkerOptions(
        engine="whatsmeow",
        credentials=PostgresCredentials(database.url),
        heartbeat_interval=60.0,
        dial_timeout=60.0,
    )
    reports = Reports()
    engine = WorkerEngine(options, reports, SystemClock())
    session = await database.create("real")
    try:
        with pytest.raises(EngineError) as offline:
            await engine.start_pairing(session)  # this machine cannot reach WhatsApp
        assert offline.value.code == "DIAL_FAILED"
        assert "failed to upgrade database" not in offline.value.message  # the store opened
        connection = await asyncpg.connect(database.url)
        try:
            tables = await connection.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                f"wa_device_{session.id}",
            )
            elsewhere = await connection.fetchval(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_name = 'whatsmeow_device' AND table_schema <> $1",
                f"wa_device_{session.id}",
            )
        finally:
            await connection.close()
        assert "whatsmeow_device" in {row["table_name"] for row in tables}
        assert elsewhere == 0

        await engine.restore(session, PHONE)  # no device was paired: a new QR is needed
        ended = await reports.until(states.Disconnected, within=30.0)
        assert isinstance(ended, states.Disconnected)
        assert ended.reason == LOGOUT
    finally:
        await engine.close()


async def test_a_reconnection_needs_no_credential_write(
    database: Database, nodes: Callable[[], Node]
) -> None:
    node = nodes()
    session = await database.create("steady")
    await paired(node, session)
    name = database.url.rpartition("/")[2]
    admin = await asyncpg.connect(database.url)
    try:  # the credentials can be read but not written (a standby, a database restarting)
        await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        await node.phone.drop_network(session, hold_reconnect=False)
    finally:
        await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        await admin.close()
    assert node.reports.of(states.Connected) == [states.Connected(PHONE)] * 2  # back again


async def test_a_stale_owners_worker_cannot_write_the_sessions_credentials(
    database: Database, nodes: Callable[[], Node]
) -> None:
    first, second = nodes(), nodes()
    session = await database.create("fenced")
    first.engine.hold("fenced", boottime() + 60, 1)
    await paired(first, session)
    assert await database.device(session, 1) == PHONE

    # The second node took the lease over (epoch 2); the first never learnt it (frozen).
    second.engine.hold("fenced", boottime() + 60, 2)
    await second.engine.restore(session, None)
    assert await second.reports.until(states.Connected) == states.Connected(PHONE)
    schemas = await database.schemas()
    assert f"wa_device_{session.id}_e2" in schemas
    assert f"wa_device_{session.id}_e1" not in schemas

    stale = first.engine.worker(session)
    assert stale is not None
    assert stale.alive
    with pytest.raises(EngineError) as refused:  # its worker records a device: refused
        await first.phone.scan(session, "+15550001111", hold_handshake=False)
    assert refused.value.code == "CREDENTIALS_UNAVAILABLE"
    assert await database.device(session, 2) == PHONE
    await second.phone.scan(session, "+15550002222", hold_handshake=False)
    assert await database.device(session, 2) == "+15550002222"  # the owner's worker writes

    with pytest.raises(EngineError) as fenced:  # nor does the stale node start another one
        await first.engine.start_pairing(session)
    assert fenced.value.code == "CREDENTIALS_FENCED"
    assert await database.device(session, 2) == "+15550002222"  # and its wipe kept them


async def test_a_stale_transaction_on_the_credentials_ends_before_the_new_owner_starts(
    database: Database,
) -> None:
    credentials = PostgresCredentials(database.url)
    session = await database.create("midway")
    old = await asyncpg.connect(await credentials.prepare(session, 1))  # as epoch 1's worker
    try:
        await old.execute("CREATE TABLE device (phone_number text NOT NULL)")
        await old.execute("INSERT INTO device VALUES ('+1')")
        midway = old.transaction()
        await midway.start()
        await old.execute("UPDATE device SET phone_number = '+2'")

        location = await credentials.prepare(session, 2)  # a new owner, while it is open

        assert old.is_closed() or await _fails(old.execute("SELECT 1"))
    finally:
        old.terminate()
    new = await asyncpg.connect(location)
    try:
        assert await new.fetchval("SELECT phone_number FROM device") == "+1"  # never committed
    finally:
        await new.close()
    again = await asyncpg.connect(credentials.location(session, 1))  # the old one reconnects
    try:
        assert await _fails(again.execute("UPDATE device SET phone_number = '+3'"))
        assert await _fails(again.execute("CREATE TABLE device (phone_number text)"))
    finally:
        await again.close()
    with pytest.raises(EngineError) as fenced:  # and cannot take the schema back
        await credentials.prepare(session, 1)
    assert fenced.value.code == "CREDENTIALS_FENCED"


async def test_fencing_leaves_the_workers_of_another_database_alone(
    database: Database, postgres_cluster: Cluster
) -> None:
    """Session ids are per database: one server may hold several deployments' databases."""
    neighbour_url = await postgres_cluster.create_database()
    neighbour_store = await postgres.Store.open(neighbour_url, "n1")
    try:
        row = await neighbour_store.insert_session(new_session("theirs", SystemClock().now()))
    finally:
        await neighbour_store.close()
    theirs = SessionRef("theirs", row)
    ours = await database.create("ours")
    assert ours.id == theirs.id  # the same schema and tag names in both databases
    neighbour = PostgresCredentials(neighbour_url)
    worker = await asyncpg.connect(await neighbour.prepare(theirs, 1))
    try:
        credentials = PostgresCredentials(database.url)
        await credentials.prepare(ours, 1)
        await credentials.prepare(ours, 2)  # ends epoch 1's connections, of this database
        assert await worker.fetchval("SELECT 1") == 1
    finally:
        await worker.close()


async def _fails(operation: Awaitable[object]) -> bool:
    """Whether the database refused the operation (or the connection is gone: asyncpg may
    notice a terminated connection only as a protocol state it cannot leave)."""
    try:
        await operation
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        ConnectionError,
    ):
        return True
    return False


async def test_a_stale_whatsmeow_worker_cannot_write_the_credentials(database: Database) -> None:
    credentials = PostgresCredentials(database.url)
    session = await database.create("stale-real")
    stale_location = await credentials.prepare(session, 1)
    await credentials.prepare(session, 2)  # a newer owner fenced them

    async def report(worker: WorkerProcess, event: EngineEvent) -> None:
        pass

    worker = await WorkerProcess.start(  # whatsmeow (lib/pq) with what epoch 1 was given
        session,
        [
            "--engine=whatsmeow",
            f"--instance-id={session.instance_id}",
            f"--session-id={session.id}",
            f"--parent-pid={os.getpid()}",
        ],
        report,
        SystemClock().now,
        {LOCATION_VARIABLE: stale_location},
    )
    try:
        reply = await worker.call(Command(start_pairing=Command.StartPairing()), 60)
    finally:
        await worker.stop(5)
    assert "failed to upgrade database" in reply.error_message  # its store could not open
    connection = await asyncpg.connect(database.url)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'whatsmeow%'"
        )
    finally:
        await connection.close()
    assert tables == 0  # it wrote nothing anywhere


async def _fact(node: asyncio.subprocess.Process) -> dict[str, object]:
    """The next JSON line the node process prints (``tests.lease_node``)."""
    assert node.stdout is not None
    line = await asyncio.wait_for(node.stdout.readline(), 30.0)
    assert line, "the node process ended"
    fact: dict[str, object] = json.loads(line)
    return fact


async def test_a_frozen_node_cannot_keep_its_worker_alive(tmp_path: Path) -> None:
    node = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.lease_node",
        str(tmp_path / "devices"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        worker = (await _fact(node))["worker"]
        assert isinstance(worker, int)
        assert alive(worker)

        os.kill(node.pid, signal.SIGSTOP)  # no more Holds, no more anything
        await eventually(lambda: not alive(worker), within=10.0)
        os.kill(node.pid, signal.SIGCONT)
        assert node.stdin is not None
        node.stdin.write(b"ended\n")

        after = await _fact(node)
        assert after["exit"] == EXIT_LEASE_EXPIRED
        assert after["workers"] == {}  # not restarted, although its node renews again
        assert after["reports"] == 0  # and not reported as a crash
    finally:
        with contextlib.suppress(ProcessLookupError):
            node.kill()
        await node.wait()


async def test_releasing_a_simulated_session_stops_its_codes() -> None:
    clock = ManualClock()
    reports = Reports()
    engine = SimulatedEngine(reports, clock, PairingTimes(first=10.0, rotation=5.0, codes=3))
    session = SessionRef("moving", 7)
    await engine.start_pairing(session)
    await engine.release(session)
    await clock.advance(30.0)
    assert len(reports.of(states.QRShown)) == 1  # no rotation after the release
    with pytest.raises(EngineError):
        await engine.pair_phone(session, PHONE)  # the device is forgotten


def test_a_sessions_schema_is_selected_in_its_url() -> None:
    url = "postgresql://sm:pw@db:5433/sessions?sslmode=require&search_path=public"
    assert schema_url(url, "wa_device_12", worker_tag(12)) == (
        "postgresql://sm:pw@db:5433/sessions?sslmode=require&search_path=wa_device_12"
        "&application_name=sm-worker%20wa_device_12"
    )
    # lib/pq would require TLS where the server's store (asyncpg) only prefers it.
    tag = worker_tag(3, 2)
    assert tag == "sm-worker wa_device_3 epoch 2"
    assert schema_url("postgresql://sm@db/sessions", "wa_device_3_e2", tag) == (
        "postgresql://sm@db/sessions?sslmode=prefer&search_path=wa_device_3_e2"
        "&application_name=sm-worker%20wa_device_3%20epoch%202"
    )
