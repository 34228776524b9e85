"""The client's watch re-subscribes across a server restart and follows ``(id, revision)``."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from sessionmanager_client import errors
from sessionmanager_client._base import Backoff, StreamCursor
from sessionmanager_client.aio import AsyncSessionManagerClient
from sessionmanager_client.enums import SessionStatus, status_of
from tests.conftest import Harness, start_harness

FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
)
FAST = Backoff(initial=0.05, maximum=0.3, max_attempts=60)


async def test_watch_resumes_across_restart(settings: Settings) -> None:
    clock = ManualClock()
    first = await start_harness(settings, clock)
    port = first.running.port
    client = AsyncSessionManagerClient(
        first.address, timeout=5, options=FAST_RECONNECT, backoff=FAST
    )
    second = None
    seen = []
    try:
        await client.create_session("sender_51")
        watch = client.watch("sender_51")
        seen.append(await asyncio.wait_for(anext(watch), 5))
        await client.request_qr("sender_51")
        seen.append(await asyncio.wait_for(anext(watch), 5))
        assert [s.revision for s in seen] == [1, 2]

        # The server goes away (its watch streams end with UNAVAILABLE) and a
        # new one starts on the same database and the same port.
        pending = asyncio.ensure_future(anext(watch))
        await first.stop()
        await asyncio.sleep(0.2)
        assert not pending.done()
        second = await start_harness(replace(settings, address=f"127.0.0.1:{port}"), clock)

        # The re-subscription's first message (revision 2 again) is not repeated.
        # The phone is driven through the new server's own stubs: Send-like
        # commands are not retried by the client, and its channel may still be
        # reconnecting.
        await second.simulator.ScanQR(
            sim.ScanQRRequest(
                instance_id="sender_51", phone_number="+5491122334455", hold_handshake=True
            )
        )
        seen.append(await asyncio.wait_for(pending, 10))
        await second.simulator.CompleteHandshake(
            sim.CompleteHandshakeRequest(instance_id="sender_51")
        )
        seen.append(await asyncio.wait_for(anext(watch), 5))
        await watch.aclose()
    finally:
        await client.close()
        if second is not None:
            await second.stop()

    revisions = [s.revision for s in seen]
    assert revisions == [1, 2, 3, 4]
    assert [status_of(s) for s in seen] == [
        SessionStatus.INIT,
        SessionStatus.QR_REQUIRED,
        SessionStatus.CONNECTING,
        SessionStatus.CONNECTED,
    ]


async def test_watch_gives_up_after_bounded_attempts(settings: Settings) -> None:
    harness = await start_harness(settings, ManualClock())
    client = AsyncSessionManagerClient(
        harness.address,
        timeout=5,
        retry=False,
        backoff=Backoff(initial=0.01, maximum=0.02, max_attempts=3),
    )
    try:
        await client.create_session("sender_51")
        watch = client.watch("sender_51")
        assert (await anext(watch)).revision == 1
        await harness.stop()
        with pytest.raises(errors.SessionManagerUnavailableError):
            await asyncio.wait_for(anext(watch), 10)
    finally:
        await client.close()


async def test_watch_ends_when_the_session_is_deleted(settings: Settings) -> None:
    harness = await start_harness(settings, ManualClock())
    client = AsyncSessionManagerClient(harness.address, timeout=5)
    try:
        await client.create_session("sender_51")
        watch = client.watch("sender_51")
        assert (await anext(watch)).revision == 1
        await client.delete_session("sender_51")
        with pytest.raises(errors.SessionNotFoundError):
            await asyncio.wait_for(anext(watch), 5)
    finally:
        await client.close()
        await harness.stop()


async def test_watch_follows_a_session_recreated_while_it_resubscribes(settings: Settings) -> None:
    """Deleted and created again while the watch was away: the new incarnation is yielded.

    Comparing revisions alone would hide the new session (revision 2) until it
    passed the old one (revision 4), then mix the two.
    """
    clock = ManualClock()
    first = await start_harness(settings, clock)
    address = first.address
    client = AsyncSessionManagerClient(address, timeout=5, options=FAST_RECONNECT, backoff=FAST)
    last = None
    try:
        old = await client.create_session("sender_51")
        await client.request_qr("sender_51")
        await client.simulator.scan_qr("sender_51", "+5491122334455")
        watch = client.watch("sender_51")
        seen = [await asyncio.wait_for(anext(watch), 5)]
        assert (seen[0].id, seen[0].revision, status_of(seen[0])) == (
            old.id,
            4,
            SessionStatus.CONNECTED,
        )
        pending = asyncio.ensure_future(anext(watch))
        await first.stop()

        # While the watch is away, another server (on another port, so the
        # watch cannot reach it) deletes the session and creates it again.
        elsewhere = await start_harness(settings, clock)
        await elsewhere.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="sender_51"))
        await elsewhere.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_51"))
        await elsewhere.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_51"))
        await elsewhere.stop()

        last = await start_harness(replace(settings, address=address), clock)
        new = await asyncio.wait_for(pending, 10)
        assert new.id != old.id
        assert (new.revision, status_of(new)) == (2, SessionStatus.QR_REQUIRED)

        # From now on only the new incarnation is followed, revision by revision.
        await last.simulator.ScanQR(
            sim.ScanQRRequest(instance_id="sender_51", phone_number="+5491100000001")
        )
        after = [await asyncio.wait_for(anext(watch), 5) for _ in range(2)]
        assert [(s.id, s.revision) for s in after] == [(new.id, 3), (new.id, 4)]
        assert status_of(after[-1]) is SessionStatus.CONNECTED
        await watch.aclose()
    finally:
        await client.close()
        if last is not None:
            await last.stop()


async def test_a_new_watch_after_delete_and_recreate_starts_afresh(harness: Harness) -> None:
    """The watch ends with SessionNotFoundError on delete; a new one sees only the new session."""
    async with AsyncSessionManagerClient(harness.address, timeout=5) as client:
        await client.create_session("sender_51")
        old = await client.request_qr("sender_51")
        watch = client.watch("sender_51")
        assert (await asyncio.wait_for(anext(watch), 5)).revision == 2
        await client.delete_session("sender_51")
        with pytest.raises(errors.SessionNotFoundError) as ended:
            await asyncio.wait_for(anext(watch), 5)
        assert ended.value.instance_id == "sender_51"

        created = await client.create_session("sender_51")
        assert created.id != old.id
        again = client.watch("sender_51")
        first = await asyncio.wait_for(anext(again), 5)
        assert (first.id, first.revision, status_of(first)) == (created.id, 1, SessionStatus.INIT)
        await client.request_qr("sender_51")
        second = await asyncio.wait_for(anext(again), 5)
        assert (second.id, second.revision) == (created.id, 2)
        await again.aclose()


def test_backoff_is_bounded() -> None:
    policy = Backoff(initial=0.1, maximum=1.0, multiplier=2.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_the_list_stream_resumes_across_a_restart_after_its_cursor(
    settings: Settings,
) -> None:
    """``watch_sessions`` keeps the sequence number of the last event it received and
    subscribes again after it: the new server's events follow, none missed, none twice."""
    clock = ManualClock()
    first = await start_harness(settings, clock)
    port = first.running.port
    client = AsyncSessionManagerClient(
        first.address, timeout=5, options=FAST_RECONNECT, backoff=FAST
    )
    cursor = StreamCursor()
    second = None
    try:
        await client.create_session("sender_51")
        stream = client.watch_sessions(cursor=cursor, types=["session.updated"])
        state = await asyncio.wait_for(anext(stream), 5)
        assert state.session.instance_id == "sender_51"
        checkpoint = await asyncio.wait_for(anext(stream), 5)
        start = checkpoint.checkpoint.sequence
        assert cursor.sequence == start
        await client.request_qr("sender_51")
        assert (await asyncio.wait_for(anext(stream), 5)).event.sequence == start + 1

        pending = asyncio.ensure_future(anext(stream))
        await first.stop()
        second = await start_harness(replace(settings, address=f"127.0.0.1:{port}"), clock)
        await second.simulator.ScanQR(
            sim.ScanQRRequest(instance_id="sender_51", phone_number="+5491122334455")
        )
        events = [(await asyncio.wait_for(pending, 10)).event]
        events.append((await asyncio.wait_for(anext(stream), 5)).event)
        await stream.aclose()
    finally:
        await client.close()
        if second is not None:
            await second.stop()
    # The session's code was expired by the restart (its worker is gone) only with workers:
    # here the simulated phone scans the code it kept, then the handshake completes.
    assert [e.sequence for e in events] == [start + 2, start + 3]
    assert [status_of(e.session) for e in events] == [
        SessionStatus.CONNECTING,
        SessionStatus.CONNECTED,
    ]
    assert cursor.sequence == start + 3
