"""Overload protection: the per-session send rate and the watcher limits."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from google.rpc import error_details_pb2

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.status_details import error_info, next_state, retry_delay


def _details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, float]:
    return error_info(error), retry_delay(error)


async def _connected(harness: Harness, instance_id: str) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
    await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id=instance_id))
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id=instance_id))


async def test_send_rate_per_session(settings: Settings) -> None:
    limited = dataclasses.replace(settings, send_rate=2.0, send_burst=3)
    harness = await start_harness(limited, ManualClock())
    try:
        await _connected(harness, "fast")
        await _connected(harness, "other")

        def send(iid: str, key: str) -> pb.SendRequest:
            return pb.SendRequest(
                instance_id=iid, to="+5491100000000", text="hi", idempotency_key=key
            )

        for n in range(3):  # the burst
            await harness.sessions.Send(send("fast", f"k{n}"))
        with pytest.raises(grpc.aio.AioRpcError) as limited_error:
            await harness.sessions.Send(send("fast", "k3"))
        assert limited_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, delay = _details(limited_error.value)
        assert info.reason == "LIMIT_EXCEEDED"
        assert info.metadata["limit"] == "send_rate"
        assert 0 < delay <= 0.5

        # A replay sends nothing, so it is not limited; other sessions are not affected.
        replay = await harness.sessions.Send(send("fast", "k0"))
        assert replay.replayed
        await harness.sessions.Send(send("other", "k0"))

        await harness.clock.advance(delay)
        accepted = await harness.sessions.Send(send("fast", "k3"))
        assert not accepted.replayed
    finally:
        await harness.stop()


async def test_watchers_per_session_and_in_total(settings: Settings) -> None:
    limited = dataclasses.replace(settings, max_watchers_per_session=2, max_watchers=3)
    harness = await start_harness(limited, ManualClock())
    try:
        for iid in ("a", "b"):
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
        streams = []
        for iid in ("a", "a", "b"):
            stream = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id=iid))
            assert (await next_state(stream)).instance_id == iid
            streams.append(stream)

        third_on_a = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="a"))
        with pytest.raises(grpc.aio.AioRpcError) as per_session:
            await third_on_a.read()
        assert per_session.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _details(per_session.value)[0].metadata["limit"] == "watchers_per_session"

        second_on_b = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="b"))
        with pytest.raises(grpc.aio.AioRpcError) as in_total:
            await second_on_b.read()
        assert _details(in_total.value)[0].metadata["limit"] == "watchers_total"

        streams[0].cancel()  # a closed stream frees its place
        for _ in range(500):  # the server sees the cancellation shortly
            if harness.running.manager.hub.count() < 3:
                break
            await asyncio.sleep(0.01)
        assert harness.running.manager.hub.count() == 2
        again = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="b"))
        assert (await next_state(again)).instance_id == "b"
        again.cancel()
        for stream in streams[1:]:
            stream.cancel()
    finally:
        await harness.stop()
