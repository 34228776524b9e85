"""WatchSession semantics, concurrent RequestQR, and a restart on the same database."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.status_details import error_info, next_state

PHONE = "+5491122334455"


async def test_snapshot_first_then_every_change_in_order(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="w"))
    await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="w"))
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="w"))
    first = await next_state(watch)
    assert (first.revision, first.qr_status) == (2, s.QR_STATUS_GENERATED)  # the current state
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="w", phone_number=PHONE))
    for _ in range(3):
        await harness.simulator.DropNetwork(sim.DropNetworkRequest(instance_id="w"))
    seen = [await next_state(watch) for _ in range(2 + 3 * 3)]
    assert [x.revision for x in seen] == list(range(3, 14))
    assert [x.status for x in seen[:2]] == [s.SESSION_STATUS_CONNECTING, s.SESSION_STATUS_CONNECTED]
    watch.cancel()


async def test_a_slow_watcher_skips_to_the_latest_state(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="slow"))
    await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="slow"))
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="slow"))
    fast = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="slow"))
    start = (await next_state(fast)).revision
    # The slow watcher is subscribed on the server but its stream is not
    # served while the changes are committed: it holds at most a bounded
    # queue, cleared to the latest state when full.
    slow = await harness.running.manager.watch("slow")
    assert (await slow.next()).revision == start

    changes = 200
    fast_seen: list[int] = []

    async def read_fast() -> None:
        while not fast_seen or fast_seen[-1] < start + changes:
            fast_seen.append((await next_state(fast)).revision)

    reader = asyncio.create_task(read_fast())
    for n in range(changes):  # each report is a new fault: one committed change
        await harness.engine.ReportError(
            engine.ReportErrorRequest(instance_id="slow", code=f"FAULT_{n}", message="m")
        )
    await asyncio.wait_for(reader, timeout=30)
    assert fast_seen == list(range(start + 1, start + changes + 1))  # every change, in order

    slow_seen: list[int] = []
    while not slow_seen or slow_seen[-1] < start + changes:
        slow_seen.append((await slow.next()).revision)
    assert slow_seen[-1] == start + changes  # ends on the latest
    assert slow_seen == sorted(set(slow_seen))  # in order, no repeats
    assert len(slow_seen) < changes  # skipped intermediate states
    harness.running.manager.unwatch("slow", slow)
    fast.cancel()


async def test_deletion_ends_the_stream_with_not_found(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="gone"))
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="gone"))
    await next_state(watch)
    await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="gone"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await watch.read()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(ended.value).reason == "SESSION_NOT_FOUND"


async def test_unknown_session_cannot_be_watched(harness: Harness) -> None:
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="nobody"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch.read()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shutdown_ends_the_stream_with_unavailable(settings: Settings) -> None:
    harness = await start_harness(settings, ManualClock())
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="bye"))
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="bye"))
    await next_state(watch)
    await harness.running.stop(grace=5)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await watch.read()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    await harness.channel.close(None)


async def test_fifty_concurrent_request_qr_make_one_code(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="race"))
    answers = await asyncio.gather(
        *(harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="race")) for _ in range(50))
    )
    assert len({a.qr_string for a in answers}) == 1
    assert {a.session.revision for a in answers} == {2}  # one code, one commit
    session = (await harness.sessions.GetSession(pb.GetSessionRequest(instance_id="race"))).session
    assert session.revision == 2


async def test_restart_brings_back_every_session(settings: Settings) -> None:
    clock = ManualClock()
    first = await start_harness(settings, clock)
    ids = {"s_init", "s_qr", "s_connected", "s_logout", "s_error"}
    for iid in sorted(ids):
        await first.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
    for iid in ("s_qr", "s_connected", "s_logout"):
        await first.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))
    for iid in ("s_connected", "s_logout"):
        await first.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number=PHONE))
    await first.sessions.Disconnect(pb.DisconnectRequest(instance_id="s_logout"))
    await first.simulator.FailSession(
        sim.FailSessionRequest(instance_id="s_error", code="CLIENT_OUTDATED")
    )
    await clock.advance(10)
    before = {
        x.instance_id: x
        for x in (await first.sessions.ListSessions(pb.ListSessionsRequest())).sessions
    }
    await first.stop()

    second = await start_harness(dataclasses.replace(settings), clock)
    try:
        for _ in range(100):  # the connected session is restored in the background
            restored = (
                await second.sessions.GetSession(pb.GetSessionRequest(instance_id="s_connected"))
            ).session
            if restored.revision == before["s_connected"].revision + 2:
                break
            await asyncio.sleep(0.01)
        after = {
            x.instance_id: x
            for x in (await second.sessions.ListSessions(pb.ListSessionsRequest())).sessions
        }
        assert after.keys() == ids
        for iid in ids - {"s_connected"}:
            assert after[iid] == before[iid], iid  # every field and revision as it was
        # connected before: connecting -> connected by itself, no QR
        assert after["s_connected"].status == s.SESSION_STATUS_CONNECTED
        assert after["s_connected"].qr_status == s.QR_STATUS_NONE
        assert after["s_connected"].phone_number == PHONE
        assert after["s_connected"].revision == before["s_connected"].revision + 2

        # the pending QR still expires at its qr_expires_at, and watchers are told
        pending = after["s_qr"]
        watch = second.sessions.WatchSession(pb.WatchSessionRequest(instance_id="s_qr"))
        assert (await next_state(watch)).revision == pending.revision
        left = (
            pending.qr_expires_at.ToDatetime() - clock.now().replace(tzinfo=None)
        ).total_seconds()
        assert left == 50
        await clock.advance(left)
        expired = await next_state(watch)
        assert expired.qr_status == s.QR_STATUS_EXPIRED
        assert expired.revision == pending.revision + 1
        watch.cancel()
    finally:
        await second.stop()
