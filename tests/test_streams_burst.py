"""Thousands of watch streams opened at once are all served."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from tests.conftest import start_harness
from tests.status_details import next_state

STREAMS = 3_000


async def test_a_burst_of_watch_streams(settings: Settings) -> None:
    roomy = dataclasses.replace(settings, max_watchers_per_session=STREAMS)
    harness = await start_harness(roomy, ManualClock())
    try:
        await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="popular"))
        channels = [grpc.aio.insecure_channel(harness.address) for _ in range(3)]
        stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]
        calls = [
            stubs[n % 3].WatchSession(pb.WatchSessionRequest(instance_id="popular"))
            for n in range(STREAMS)
        ]
        firsts = await asyncio.wait_for(
            asyncio.gather(*(next_state(call) for call in calls), return_exceptions=True), 120
        )
        failed = [f for f in firsts if isinstance(f, BaseException)]
        assert not failed, f"{len(failed)} of {STREAMS} streams failed: {failed[0]!r}"
        assert harness.running.manager.hub.count() == STREAMS
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close(None)
    finally:
        await harness.stop()
