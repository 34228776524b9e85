"""A storage outage while workers report: nothing wedged, nothing lost, nothing misreported.

The black-box test runs a real server (``session-manager serve
--engine=simulated-worker`` on a SQLite file) with connected sessions in
worker processes, and makes its disk refuse writes from outside, as a full
disk would: the server's ``RLIMIT_FSIZE`` is lowered to 0 with prlimit(2), so
every write to its database files fails (EFBIG, which SQLite reports as a disk
I/O error), and raised again to free the space. The other tests drive
``WorkerEngine`` and ``WorkerProcess`` directly with a node's ``Report`` whose
commits fail on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from service.clock import SystemClock
from service.domain import states
from service.domain.contract import NETWORK, UNKNOWN
from service.domain.states import EngineEvent, SessionRef
from service.engine.phone import WorkerPhone
from service.engine.process import WorkerGone, WorkerProcess
from service.engine.protocol import Command
from service.engine.supervisor import WorkerEngine, WorkerOptions
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.flows import PHONE, eventually
from tests.processes import alive, live_children
from tests.servers import ServerProcess
from tests.status_details import error_info

#: What "at once" means for an answer that must not wait out a deadline (30 s).
AT_ONCE = 5.0
SHUTDOWN_GRACE = 2.0
#: How long the server may take past its grace: stopping the workers (5 s at the most).
STOP_BOUND = 6.0


@contextlib.contextmanager
def writes_refused(pid: int) -> Iterator[None]:
    """The process ``pid`` may not write to any file while inside, as on a full disk."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


async def _connect(channel: grpc.aio.Channel, instance_id: str) -> s.WhatsAppSession:
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    simulator = simulator_service_pb2_grpc.SimulatorServiceStub(channel)
    await sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
    await sessions.RequestQR(pb.RequestQRRequest(instance_id=instance_id))
    scanned = await simulator.ScanQR(sim.ScanQRRequest(instance_id=instance_id, phone_number=PHONE))
    assert scanned.session.status == s.SESSION_STATUS_CONNECTED
    return scanned.session


async def _get(channel: grpc.aio.Channel, instance_id: str) -> s.WhatsAppSession:
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    answer = await sessions.GetSession(pb.GetSessionRequest(instance_id=instance_id))
    return answer.session


async def _after(channel: grpc.aio.Channel, before: s.WhatsAppSession) -> s.WhatsAppSession:
    """The session once it has committed the network drop and come back (within 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        session = await _get(channel, before.instance_id)
        if session.status == s.SESSION_STATUS_CONNECTED and session.revision >= before.revision + 3:
            return session
        assert time.monotonic() < deadline, f"the drop was never committed: {session}"
        await asyncio.sleep(0.1)


async def test_a_full_disk_while_workers_report_ends_well(tmp_path: Path) -> None:
    with ServerProcess.start(
        tmp_path / "sessions.db",
        "--engine=simulated-worker",
        f"--devices-dir={tmp_path / 'devices'}",
        f"--shutdown-grace={SHUTDOWN_GRACE}",
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            simulator = simulator_service_pb2_grpc.SimulatorServiceStub(channel)
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            before = {iid: await _connect(channel, iid) for iid in ("kept", "dropped")}
            assert len(live_children(server.pid)) == 2

            with writes_refused(server.pid):
                for iid in before:
                    started = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await simulator.DropNetwork(
                            sim.DropNetworkRequest(instance_id=iid), timeout=20
                        )
                    assert time.monotonic() - started < AT_ONCE  # not after its 30 s deadline
                    assert error_info(refused.value).reason == "STORAGE_UNAVAILABLE"

            # The space is free again: what the workers reported is stored, in order.
            for then in before.values():
                now = await _after(channel, then)
                assert now.phone_number == PHONE
            workers = live_children(server.pid)
            assert len(workers) == 2  # connected, each with a running worker

            sent = await sessions.Send(
                pb.SendRequest(instance_id="kept", to=PHONE, text="hola"), timeout=10
            )
            assert sent.status == pb.MESSAGE_STATUS_SENT  # handed over and answered, not unknown

            started = time.monotonic()
            gone = await sessions.Disconnect(
                pb.DisconnectRequest(instance_id="dropped"), timeout=20
            )
            assert time.monotonic() - started < AT_ONCE
            assert gone.session.status == s.SESSION_STATUS_DISCONNECTED
            await eventually(lambda: len(live_children(server.pid)) == 1)

        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=SHUTDOWN_GRACE + STOP_BOUND + 10) == 0
        assert time.monotonic() - started < SHUTDOWN_GRACE + STOP_BOUND
        assert not any(alive(pid) for pid in workers)


class FlakyReports:
    """A node's ``Report`` whose commits fail, as on a full disk, while ``failing``."""

    def __init__(self) -> None:
        self.failing = False
        self.stored: list[EngineEvent] = []
        self._arrived = asyncio.Event()

    async def __call__(self, session: SessionRef, event: EngineEvent) -> None:
        if self.failing:
            raise sqlite3.OperationalError("database or disk is full")
        self.stored.append(event)
        self._arrived.set()

    async def until(self, count: int, within: float = 15.0) -> list[EngineEvent]:
        """The stored events once there are ``count`` of them."""
        async with asyncio.timeout(within):
            while len(self.stored) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.stored


@dataclasses.dataclass
class Engine:
    engine: WorkerEngine
    reports: FlakyReports
    phone: WorkerPhone


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    options = WorkerOptions(
        engine="simulated",
        devices_dir=tmp_path / "devices",
        heartbeat_interval=60.0,
        restart_initial=0.1,
        report_retry_for=1.0,
        crash_limit=1,  # a lost report is no crash: one crash would end the session in error
    )
    reports = FlakyReports()
    worker_engine = WorkerEngine(options, reports, SystemClock())
    try:
        yield Engine(worker_engine, reports, WorkerPhone(worker_engine))
    finally:
        await worker_engine.close()


async def _paired(engine: Engine, session: SessionRef) -> int:
    await engine.engine.start_pairing(session)
    await engine.phone.scan(session, PHONE, hold_handshake=False)
    stored = await engine.reports.until(3)
    assert [type(e) for e in stored] == [states.QRShown, states.QRScanned, states.Connected]
    return engine.engine.worker_pids()[session.instance_id]


async def test_a_report_stored_late_keeps_its_worker_and_its_order(engine: Engine) -> None:
    session = SessionRef("blip", 1)
    pid = await _paired(engine, session)
    engine.reports.failing = True
    with pytest.raises(sqlite3.OperationalError):  # at once, with the storage's own error
        await asyncio.wait_for(engine.phone.drop_network(session, hold_reconnect=False), AT_ONCE)
    # The worker goes on: a heartbeat and a send are answered while the report waits.
    assert await engine.engine.send(session, PHONE, "hola") != ""
    engine.reports.failing = False
    stored = await engine.reports.until(6)
    assert [type(e) for e in stored[3:]] == [
        states.Disconnected,
        states.Reconnecting,
        states.Connected,
    ]
    assert stored[3] == states.Disconnected(NETWORK, "")
    assert engine.engine.worker_pids()[session.instance_id] == pid


async def test_a_report_that_cannot_be_stored_stops_its_worker_and_is_told(
    engine: Engine,
) -> None:
    session = SessionRef("outage", 1)
    pid = await _paired(engine, session)
    engine.reports.failing = True
    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(engine.phone.drop_network(session, hold_reconnect=False), AT_ONCE)
    # Past report_retry_for the worker is stopped; nothing starts while nothing can be stored.
    await eventually(lambda: not alive(pid), within=10)
    assert engine.engine.worker_pids() == {}
    engine.reports.failing = False
    stored = await engine.reports.until(6)
    told = stored[3]
    assert isinstance(told, states.Disconnected)
    assert (told.reason, told.code) == (UNKNOWN, "REPORT_NOT_STORED")
    assert "could not be stored" in told.message
    assert [type(e) for e in stored[4:]] == [states.Reconnecting, states.Connected]
    # The lost report and those after it, from a worker that is gone, never land.
    assert all(e != states.Disconnected(NETWORK, "") for e in stored)
    new_pid = engine.engine.worker_pids()[session.instance_id]
    assert new_pid != pid
    assert await engine.engine.send(session, PHONE, "hola") != ""


async def test_a_worker_outlives_a_failure_of_its_report_handling(tmp_path: Path) -> None:
    async def broken(worker: WorkerProcess, event: EngineEvent) -> None:
        raise RuntimeError("a bug in the supervisor")

    session = SessionRef("broken", 1)
    worker = await WorkerProcess.start(
        session,
        [
            "--engine=simulated",
            "--instance-id=broken",
            "--session-id=1",
            f"--parent-pid={os.getpid()}",
            f"--credentials={tmp_path}",
        ],
        broken,
        SystemClock().now,
    )
    # Its first code cannot be relayed: the worker is ended (its reply may come first).
    with contextlib.suppress(WorkerGone):
        await worker.call(Command(start_pairing=Command.StartPairing()), 10, after_reports=True)
    assert await worker.wait_exit(10) == -signal.SIGKILL
    code, message = worker.exit_cause()
    assert code == "REPORT_FAILED"
    assert "a bug in the supervisor" in message
    started = time.monotonic()
    await worker.stop(5)  # returns at once: it has exited
    assert time.monotonic() - started < 1


async def test_pairing_ends_with_its_first_code_stored_on_a_retry(engine: Engine) -> None:
    session = SessionRef("late-code", 1)
    engine.reports.failing = True
    pairing = asyncio.ensure_future(engine.engine.start_pairing(session))
    await eventually(lambda: engine.engine.worker(session) is not None)
    worker = engine.engine.worker(session)
    assert worker is not None
    await eventually(lambda: worker.unstored is not None)
    assert not pairing.done()  # not while its first code may still land
    engine.reports.failing = False
    await asyncio.wait_for(pairing, AT_ONCE)
    assert [type(e) for e in engine.reports.stored] == [states.QRShown]


async def test_pairing_whose_first_code_is_lost_fails_with_nothing_stored(engine: Engine) -> None:
    session = SessionRef("no-code", 1)
    engine.reports.failing = True
    with pytest.raises(sqlite3.OperationalError):  # past report_retry_for (1 s here)
        await asyncio.wait_for(engine.engine.start_pairing(session), AT_ONCE)
    engine.reports.failing = False
    assert engine.engine.worker_pids() == {}
    # Nothing followed behind the caller's back: the next pairing's code is the first report.
    await engine.engine.start_pairing(session)
    assert [type(e) for e in engine.reports.stored] == [states.QRShown]
