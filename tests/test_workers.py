"""The simulated engine out of process: the whole worker supervision path.

Each test starts a real server on port 0 with ``--engine simulated-worker``:
every session that pairs or connects gets its own worker process, driven by
the same worker protocol as the real engine. Workers are killed with SIGKILL,
frozen with SIGSTOP, and the server itself is killed, to show that sessions
move as the contract says, workers come back, nothing stored is lost and no
process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.engine.supervisor import WorkerEngine
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.flows import PHONE, connected, eventually, session_of, states_until
from tests.processes import alive, live_children
from tests.servers import ServerProcess
from tests.status_details import error_info


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    return replace(settings, engine="simulated-worker", worker_heartbeat=0.5, dial_timeout=10.0)


@pytest.fixture
async def workers(worker_settings: Settings) -> AsyncIterator[Harness]:
    harness = await start_harness(worker_settings, ManualClock())
    try:
        yield harness
    finally:
        await harness.stop()


def _engine(h: Harness) -> WorkerEngine:
    engine = h.running.engine
    assert isinstance(engine, WorkerEngine)
    return engine


def _status(session: s.WhatsAppSession) -> tuple[int, int]:
    return session.status, session.qr_status


async def test_a_session_lives_in_its_own_worker(workers: Harness) -> None:
    engine = _engine(workers)
    await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="own"))
    assert engine.worker_pids() == {}  # no worker before pairing
    qr = await workers.sessions.RequestQR(pb.RequestQRRequest(instance_id="own"))
    assert qr.qr_string.startswith("data:image/png;base64,")
    pid = engine.worker_pids()["own"]
    assert pid != os.getpid()
    assert alive(pid)
    assert engine.device_dir(await workers.running.manager.ref("own")).is_dir()

    scanned = await workers.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="own", phone_number=PHONE)
    )
    assert scanned.session.status == s.SESSION_STATUS_CONNECTED
    assert scanned.session.phone_number == PHONE
    device = engine.device_dir(await workers.running.manager.ref("own")) / "device.json"
    assert PHONE in device.read_text()  # the paired device is recorded, as whatsmeow stores it
    sent = await workers.sessions.Send(pb.SendRequest(instance_id="own", to=PHONE, text="hola"))
    assert sent.whatsapp_message_id.startswith("3EB0")

    await workers.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="own", fault=sim.FAULT_SEND)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await workers.sessions.Send(pb.SendRequest(instance_id="own", to=PHONE, text="hola"))
    assert error_info(refused.value).reason == "WHATSAPP_ERROR"

    disconnected = await workers.sessions.Disconnect(pb.DisconnectRequest(instance_id="own"))
    assert disconnected.session.last_error_code == "LOGOUT"
    assert "own" not in engine.worker_pids()
    await eventually(lambda: not alive(pid))
    assert not engine.device_dir(
        await workers.running.manager.ref("own")
    ).exists()  # credentials are wiped on logout


async def test_killing_a_connected_worker(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "crash")
    key = "order-1"
    first = await workers.sessions.Send(
        pb.SendRequest(instance_id="crash", to=PHONE, text="hola", idempotency_key=key)
    )
    pid = engine.worker_pids()["crash"]

    os.kill(pid, signal.SIGKILL)
    seen = await states_until(
        workers, "crash", lambda x: x.status == s.SESSION_STATUS_CONNECTED and x.revision > 4
    )
    crashed = next(x for x in seen if x.status == s.SESSION_STATUS_DISCONNECTED)
    assert crashed.last_error_code == "WORKER_CRASHED"
    assert "SIGKILL" in crashed.last_error_message
    assert [x.status for x in seen][-2:] == [
        s.SESSION_STATUS_CONNECTING,
        s.SESSION_STATUS_CONNECTED,
    ]
    assert seen[-1].phone_number == PHONE  # reconnected without a QR code

    new_pid = engine.worker_pids()["crash"]
    assert new_pid != pid
    assert alive(new_pid)
    replay = await workers.sessions.Send(
        pb.SendRequest(instance_id="crash", to=PHONE, text="hola", idempotency_key=key)
    )
    assert replay.message_id == first.message_id
    assert replay.replayed
    again = await workers.sessions.Send(pb.SendRequest(instance_id="crash", to=PHONE, text="2"))
    assert again.status == pb.MESSAGE_STATUS_SENT  # and the new worker sends


async def test_killing_a_pairing_worker_shows_a_new_code(workers: Harness) -> None:
    engine = _engine(workers)
    await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="pairing"))
    first = await workers.sessions.RequestQR(pb.RequestQRRequest(instance_id="pairing"))
    pid = engine.worker_pids()["pairing"]

    os.kill(pid, signal.SIGKILL)
    seen = await states_until(
        workers,
        "pairing",
        lambda x: x.qr_status == s.QR_STATUS_GENERATED and x.qr_string != first.qr_string,
    )
    dead = next(x for x in seen if x.qr_status == s.QR_STATUS_EXPIRED)
    assert dead.status == s.SESSION_STATUS_QR_REQUIRED  # the old code cannot be scanned
    assert dead.last_error_code == "WORKER_CRASHED"
    assert engine.worker_pids()["pairing"] != pid

    again = await workers.sessions.RequestQR(pb.RequestQRRequest(instance_id="pairing"))
    assert again.qr_string == seen[-1].qr_string  # the new code is the valid one
    scanned = await workers.simulator.ScanQR(sim.ScanQRRequest(instance_id="pairing"))
    assert scanned.session.status == s.SESSION_STATUS_CONNECTED


async def test_a_frozen_worker_is_killed_and_replaced(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "frozen")
    pid = engine.worker_pids()["frozen"]

    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing: no heartbeat
    seen = await states_until(
        workers, "frozen", lambda x: x.status == s.SESSION_STATUS_CONNECTED and x.revision > 4
    )
    hung = next(x for x in seen if x.status == s.SESSION_STATUS_DISCONNECTED)
    assert hung.last_error_code == "WORKER_UNRESPONSIVE"
    await eventually(lambda: not alive(pid))
    assert engine.worker_pids()["frozen"] != pid


async def test_repeated_crashes_end_in_error(settings: Settings) -> None:
    harness = await start_harness(
        replace(
            settings,
            engine="simulated-worker",
            worker_crash_limit=3,
            metrics_address="127.0.0.1:0",
        ),
        ManualClock(),
    )
    try:
        engine = _engine(harness)
        await connected(harness, "loop")
        for _ in range(3):
            await eventually(lambda: "loop" in engine.worker_pids())
            os.kill(engine.worker_pids()["loop"], signal.SIGKILL)
            await eventually(lambda: "loop" not in engine.worker_pids())
        seen = await states_until(harness, "loop", lambda x: x.status == s.SESSION_STATUS_ERROR)
        assert seen[-1].last_error_code == "WORKER_CRASH_LOOP"
        assert "3 times" in seen[-1].last_error_message
        await asyncio.sleep(1.0)
        assert "loop" not in engine.worker_pids()  # not restarted any more
        metrics = harness.running.metrics
        assert metrics is not None
        restarts = metrics.registry.get_sample_value("sessionmanager_worker_restarts_total")
        assert restarts == 2  # the third crash is not restarted
        # A new pairing is a fresh start.
        qr = await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="loop"))
        assert qr.session.status == s.SESSION_STATUS_QR_REQUIRED
    finally:
        await harness.stop()


async def test_restart_restores_connected_sessions_in_new_workers(
    worker_settings: Settings,
) -> None:
    first = await start_harness(worker_settings, ManualClock())
    try:
        await connected(first, "keep")
        await first.sessions.CreateSession(pb.CreateSessionRequest(instance_id="pair"))
        await first.sessions.RequestQR(pb.RequestQRRequest(instance_id="pair"))
        old_pids = set(_engine(first).worker_pids().values())
    finally:
        await first.stop()
    assert not any(alive(pid) for pid in old_pids)  # shutdown stopped every worker

    second = await start_harness(worker_settings, ManualClock())
    try:
        seen = await states_until(second, "keep", lambda x: x.status == s.SESSION_STATUS_CONNECTED)
        assert seen[-1].phone_number == PHONE
        assert all(x.qr_status != s.QR_STATUS_GENERATED for x in seen)  # no QR needed
        assert "keep" in _engine(second).worker_pids()
        # A code shown by a worker that is gone cannot be scanned: it is expired.
        pairing = await session_of(second, "pair")
        assert _status(pairing) == (s.SESSION_STATUS_QR_REQUIRED, s.QR_STATUS_EXPIRED)
        assert "pair" not in _engine(second).worker_pids()
    finally:
        await second.stop()


async def test_delete_stops_the_worker_and_wipes_credentials(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "gone")
    pid = engine.worker_pids()["gone"]
    device = engine.device_dir(await workers.running.manager.ref("gone"))
    assert device.is_dir()
    await workers.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="gone"))
    await eventually(lambda: not alive(pid))
    assert not device.exists()


async def test_pair_phone_through_a_worker(workers: Harness) -> None:
    await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="code"))
    paired = await workers.sessions.PairPhone(
        pb.PairPhoneRequest(instance_id="code", phone_number=PHONE)
    )
    assert len(paired.linking_code) == 8
    assert paired.linking_code.isalnum()
    assert _status(paired.session) == (s.SESSION_STATUS_QR_REQUIRED, s.QR_STATUS_GENERATED)
    linked = await workers.simulator.ScanQR(sim.ScanQRRequest(instance_id="code"))
    assert linked.session.phone_number == PHONE  # the phone that asked for the code


async def test_no_worker_outlives_a_killed_server(tmp_path: Path) -> None:
    with ServerProcess.start(tmp_path / "sessions.db", "--engine=simulated-worker") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            for iid in ("a", "b"):
                await stub.CreateSession(pb.CreateSessionRequest(instance_id=iid))
                await stub.RequestQR(pb.RequestQRRequest(instance_id=iid))
        workers = live_children(server.pid)
        assert len(workers) == 2
        server.kill()  # SIGKILL: the server gets no chance to stop its workers
        await eventually(lambda: not any(alive(pid) for pid in workers))
