"""Session identity: delete and recreate never mix incarnations.

An ``instance_id`` names a session, its ``id`` one incarnation of it. Calls
racing a delete, a pairing started before it, and a watcher of the old
incarnation never touch the new one.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.engine.supervisor import WorkerEngine
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness, start_harness
from tests.flows import eventually, session_of
from tests.status_details import error_info


@pytest.fixture
async def workers(settings: Settings) -> AsyncIterator[Harness]:
    harness = await start_harness(replace(settings, engine="simulated-worker"), ManualClock())
    try:
        yield harness
    finally:
        await harness.stop()


async def test_creates_and_deletes_racing_on_one_instance_id(harness: Harness) -> None:
    rng = random.Random(7)
    outcomes: list[str] = []

    async def create() -> None:
        try:
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="race"))
            outcomes.append("created")
        except grpc.aio.AioRpcError as error:
            outcomes.append(error_info(error).reason)

    async def delete() -> None:
        try:
            await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="race"))
            outcomes.append("deleted")
        except grpc.aio.AioRpcError as error:
            outcomes.append(error_info(error).reason)

    calls = [create() if rng.random() < 0.5 else delete() for _ in range(200)]
    await asyncio.gather(*calls)

    assert set(outcomes) <= {"created", "deleted", "SESSION_ALREADY_EXISTS", "SESSION_NOT_FOUND"}
    assert outcomes.count("created") - outcomes.count("deleted") in (0, 1)
    with sqlite3.connect(harness.settings.database) as db:
        rows = db.execute(
            "SELECT id FROM ll_whatsapp_qr_sessions WHERE instance_id = 'race'"
        ).fetchall()
    listed = await harness.sessions.ListSessions(pb.ListSessionsRequest())
    served = [(x.id,) for x in listed.sessions if x.instance_id == "race"]
    assert rows == served  # what is served is what is stored


async def test_a_pairing_started_before_a_delete_never_reaches_the_new_session(
    workers: Harness,
) -> None:
    engine = workers.running.manager.engine
    assert isinstance(engine, WorkerEngine)
    old = (
        await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="reborn"))
    ).session
    pairing = asyncio.ensure_future(
        workers.sessions.RequestQR(pb.RequestQRRequest(instance_id="reborn"))
    )
    await eventually(lambda: "reborn" in engine.worker_pids(), within=10)  # a worker is starting

    await workers.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="reborn"))
    new = (
        await workers.sessions.CreateSession(pb.CreateSessionRequest(instance_id="reborn"))
    ).session
    assert new.id != old.id

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await pairing
    assert error_info(ended.value).reason in ("SESSION_NOT_FOUND", "QR_GENERATION_FAILED")
    await eventually(lambda: "reborn" not in engine.worker_pids())  # the old worker is gone

    current = await session_of(workers, "reborn")
    assert (current.id, current.revision) == (new.id, 1)
    assert (current.status, current.qr_status) == (s.SESSION_STATUS_INIT, s.QR_STATUS_NONE)


async def test_a_watcher_of_the_old_incarnation_ends_with_it(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="w"))
    call = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="w"))
    first: Any = await call.read()
    await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="w"))
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="w"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await _read_all(call, first.session.id)
    assert error_info(ended.value).reason == "SESSION_NOT_FOUND"


async def _read_all(call: Any, session_id: int) -> None:
    """Read a watch to its end; every state must be of incarnation ``session_id``."""
    while True:
        response = await call.read()
        assert response.session.id == session_id  # never the new incarnation
