"""Side effects follow commits: a failed commit leaves the world as it was, and a
crash between a commit and its effect is completed or reported truthfully.

The store's ``commit`` fault point raises the error SQLite gives on a full disk
at the moment of COMMIT, so the transaction really rolls back. Crashes are
real SIGKILLs at named points (``SESSION_MANAGER_FAULTS``) in a server
subprocess, followed by a restart on the same database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.domain.states import SessionRef
from service.engine.supervisor import WorkerEngine
from service.engine.supervisor import device_dir as device_dir_of
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.flows import PHONE, connected, eventually, session_of
from tests.processes import alive
from tests.servers import ServerProcess
from tests.status_details import error_info

STORAGE_REASON = "STORAGE_UNAVAILABLE"


@pytest.fixture
async def workers(settings: Settings) -> AsyncIterator[Harness]:
    harness = await start_harness(
        replace(settings, engine="simulated-worker", worker_heartbeat=0.5), ManualClock()
    )
    try:
        yield harness
    finally:
        await harness.stop()


def _engine(h: Harness) -> WorkerEngine:
    engine = h.running.manager.engine
    assert isinstance(engine, WorkerEngine)
    return engine


def _pending(database: Path) -> bool:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT 1 FROM messages WHERE status = 'pending'").fetchone() is not None


def _message_status(database: Path, message_id: str) -> str:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
    assert row is not None, message_id
    return str(row[0])


async def test_a_disconnect_whose_commit_fails_changes_nothing(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "keep")
    device = engine.device_dir(await workers.running.manager.ref("keep"))
    pid = engine.worker_pids()["keep"]

    workers.running.store.faults.fail_next("commit")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await workers.sessions.Disconnect(pb.DisconnectRequest(instance_id="keep"))
    assert error_info(failed.value).reason == STORAGE_REASON

    # The device was not logged out: same worker, same credentials, still sending.
    assert (await session_of(workers, "keep")).status == s.SESSION_STATUS_CONNECTED
    assert engine.worker_pids()["keep"] == pid
    assert alive(pid)
    assert device.is_dir()
    sent = await workers.sessions.Send(pb.SendRequest(instance_id="keep", to=PHONE, text="hola"))
    assert sent.status == pb.MESSAGE_STATUS_SENT

    # Once the commit goes through, so does the logout.
    done = await workers.sessions.Disconnect(pb.DisconnectRequest(instance_id="keep"))
    assert done.session.last_error_code == "LOGOUT"
    await eventually(lambda: not alive(pid))
    assert not device.exists()


async def test_a_delete_whose_commit_fails_changes_nothing(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "stay")
    device = engine.device_dir(await workers.running.manager.ref("stay"))
    pid = engine.worker_pids()["stay"]

    workers.running.store.faults.fail_next("commit")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await workers.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="stay"))
    assert error_info(failed.value).reason == STORAGE_REASON

    assert (await session_of(workers, "stay")).status == s.SESSION_STATUS_CONNECTED
    assert alive(pid)
    assert device.is_dir()

    await workers.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="stay"))
    await eventually(lambda: not alive(pid))
    assert not device.exists()


def _count_sends(h: Harness) -> list[str]:
    """Record every message the engine is asked to send."""
    engine = h.running.manager.engine
    sent: list[str] = []
    send = engine.send

    async def counting(session: SessionRef, to: str, text: str) -> str:
        sent.append(text)
        return await send(session, to, text)

    engine.send = counting  # type: ignore[method-assign]
    return sent


async def test_a_message_whose_intent_cannot_be_recorded_is_not_sent(harness: Harness) -> None:
    await connected(harness, "full")
    sent = _count_sends(harness)
    request = pb.SendRequest(instance_id="full", to=PHONE, text="hola", idempotency_key="k1")

    harness.running.store.faults.fail_next("commit")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await harness.sessions.Send(request)
    assert error_info(failed.value).reason == STORAGE_REASON
    assert sent == []  # nothing reached WhatsApp unrecorded

    retried = await harness.sessions.Send(request)
    assert retried.status == pb.MESSAGE_STATUS_SENT
    assert not retried.replayed  # the failed attempt left nothing behind
    assert sent == ["hola"]


async def test_a_sent_message_whose_outcome_cannot_be_recorded_stays_sent(
    harness: Harness,
) -> None:
    await connected(harness, "late")
    sent = _count_sends(harness)
    request = pb.SendRequest(instance_id="late", to=PHONE, text="hola", idempotency_key="k1")

    # The key's lookup and the intent commit; the commit of its outcome fails once.
    harness.running.store.faults.fail_next("commit", after=2)
    first = await harness.sessions.Send(request)
    assert first.status == pb.MESSAGE_STATUS_SENT
    assert first.whatsapp_message_id

    replay = await harness.sessions.Send(request)
    assert (replay.message_id, replay.status, replay.replayed) == (
        first.message_id,
        pb.MESSAGE_STATUS_SENT,
        True,
    )
    assert sent == ["hola"]
    database = Path(harness.settings.database)
    await eventually(lambda: _message_status(database, first.message_id) == "sent")


async def test_a_message_whose_worker_dies_mid_send_is_unknown(workers: Harness) -> None:
    engine = _engine(workers)
    await connected(workers, "lost")
    pid = engine.worker_pids()["lost"]
    request = pb.SendRequest(instance_id="lost", to=PHONE, text="hola", idempotency_key="k1")

    os.kill(pid, signal.SIGSTOP)  # it takes the command and never answers
    call = asyncio.ensure_future(workers.sessions.Send(request))
    await eventually(lambda: _pending(Path(workers.settings.database)))  # recorded and handed over
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await call
    info = error_info(unknown.value)
    assert unknown.value.code() == grpc.StatusCode.UNKNOWN
    assert info.reason == "MESSAGE_OUTCOME_UNKNOWN"
    assert info.metadata["replayed"] == "false"

    # Never "not accepted": a repeat answers the same, and sends nothing.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await workers.sessions.Send(request)
    replayed = error_info(again.value)
    assert replayed.reason == "MESSAGE_OUTCOME_UNKNOWN"
    assert replayed.metadata["message_id"] == info.metadata["message_id"]
    assert replayed.metadata["replayed"] == "true"
    status = _message_status(Path(workers.settings.database), info.metadata["message_id"])
    assert status == "unknown"


async def test_a_reused_key_must_name_the_same_message(harness: Harness) -> None:
    await connected(harness, "keys")
    first = await harness.sessions.Send(
        pb.SendRequest(instance_id="keys", to=PHONE, text="hola", idempotency_key="k1")
    )
    for to, text in ((PHONE, "chau"), ("+5491100000000", "hola")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.sessions.Send(
                pb.SendRequest(instance_id="keys", to=to, text=text, idempotency_key="k1")
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(refused.value)
        assert (info.reason, info.metadata["field"]) == ("INVALID_ARGUMENT", "idempotency_key")
    # The same request still replays the first result.
    replay = await harness.sessions.Send(
        pb.SendRequest(instance_id="keys", to=PHONE, text="hola", idempotency_key="k1")
    )
    assert (replay.message_id, replay.replayed) == (first.message_id, True)


# Crashes between a commit and its effect, then a restart on the same database.


def _crashing(tmp_path: Path, fault: str, engine: str = "simulated") -> ServerProcess:
    return ServerProcess.start(
        tmp_path / "sessions.db",
        f"--engine={engine}",
        "--send-rate=0",
        env={"SESSION_MANAGER_FAULTS": fault},
    )


async def _connect_over(address: str, iid: str) -> s.WhatsAppSession:
    async with grpc.aio.insecure_channel(address) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        phone = simulator_service_pb2_grpc.SimulatorServiceStub(channel)
        await sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
        await sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))
        scanned = await phone.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number=PHONE))
        return scanned.session


async def test_a_crash_after_whatsapp_took_a_message_leaves_it_unknown(tmp_path: Path) -> None:
    server = _crashing(tmp_path, "send.after_effect=kill")
    await _connect_over(server.address, "crash")
    request = pb.SendRequest(instance_id="crash", to=PHONE, text="hola", idempotency_key="k1")
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as died:
            await session_service_pb2_grpc.SessionServiceStub(channel).Send(request, timeout=10)
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.wait() == -signal.SIGKILL

    restarted = ServerProcess.start(tmp_path / "sessions.db", "--engine=simulated")
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await session_service_pb2_grpc.SessionServiceStub(channel).Send(request)
        info = error_info(unknown.value)
        assert info.reason == "MESSAGE_OUTCOME_UNKNOWN"  # never "WhatsApp did not accept it"
        assert info.metadata["replayed"] == "true"
    finally:
        restarted.stop()


@pytest.mark.parametrize("operation", ["disconnect", "delete"])
async def test_a_crash_after_a_logout_commit_is_completed_at_start(
    tmp_path: Path, operation: str
) -> None:
    server = _crashing(tmp_path, f"{operation}.after_commit=kill", engine="simulated-worker")
    session = await _connect_over(server.address, "gone")
    devices = tmp_path / "devices"
    device = device_dir_of(devices, SessionRef("gone", session.id))
    assert device.is_dir()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        call: Any = (
            stub.Disconnect(pb.DisconnectRequest(instance_id="gone"), timeout=10)
            if operation == "disconnect"
            else stub.DeleteSession(pb.DeleteSessionRequest(instance_id="gone"), timeout=10)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    assert server.wait() == -signal.SIGKILL
    assert device.is_dir()  # the crash came between the commit and the effect

    restarted = ServerProcess.start(tmp_path / "sessions.db", "--engine=simulated-worker")
    try:
        assert not device.exists()  # recovery forgot the credentials before serving
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            if operation == "disconnect":
                got = await stub.GetSession(pb.GetSessionRequest(instance_id="gone"))
                assert got.session.status == s.SESSION_STATUS_DISCONNECTED
                assert got.session.last_error_code == "LOGOUT"
            else:
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.GetSession(pb.GetSessionRequest(instance_id="gone"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        restarted.stop()


async def test_after_a_logout_a_drop_of_the_old_connection_changes_nothing(
    harness: Harness,
) -> None:
    await connected(harness, "gone_1")
    await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="gone_1"))
    await harness.simulator.FailSession(sim.FailSessionRequest(instance_id="gone_1"))
    before = await session_of(harness, "gone_1")
    assert before.status == s.SESSION_STATUS_ERROR
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.simulator.DropNetwork(
            sim.DropNetworkRequest(instance_id="gone_1", hold_reconnect=True)
        )
    assert error_info(refused.value).reason == "INVALID_TRANSITION"
    assert await session_of(harness, "gone_1") == before  # refused whole, not half


async def test_a_first_code_stored_on_a_retry_answers_request_qr_with_it(
    workers: Harness,
) -> None:
    """A RequestQR never says "nothing was stored" while its code may still land."""
    await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="blip"))
    workers.running.store.faults.fail_next("commit")  # the worker's first code, once
    shown = await workers.sessions.RequestQR(pb.RequestQRRequest(instance_id="blip"))
    assert shown.session.qr_status == s.QR_STATUS_GENERATED
    assert (await session_of(workers, "blip")).revision == shown.session.revision
