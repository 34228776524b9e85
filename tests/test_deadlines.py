"""Deadlines are honoured on every path: a call never outlives its deadline,
and one that ends there changes nothing and leaks nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness
from tests.status_details import next_state


async def test_request_qr_with_a_stalled_engine(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="slow"))
    stalled = asyncio.Event()

    async def never_shows_a_code(instance_id: str) -> None:
        await stalled.wait()

    monkeypatch.setattr(harness.running.engine, "start_pairing", never_shows_a_code)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="slow"), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    session = await harness.sessions.GetSession(pb.GetSessionRequest(instance_id="slow"))
    assert session.session.status == session_pb2.SESSION_STATUS_INIT
    assert session.session.revision == 1
    stalled.set()


async def test_watch_ends_at_its_deadline_and_frees_its_place(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="w"))
    call = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="w"), timeout=0.3)
    assert (await next_state(call)).instance_id == "w"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    hub = harness.running.manager.hub
    for _ in range(300):
        if hub.count() == 0:
            break
        await asyncio.sleep(0.01)
    assert hub.count() == 0
