"""The event log on one node (SQLite): what is appended, and streams that resume.

Every committed change of a session and every move of a message's status is
one event, appended in the transaction that commits it; ``WatchSessions`` and
``GET /api/session-manager/events`` give the current state, or every event
after a cursor, then every event in order. A reader cut off at random points
and resumed from its cursor sees every event exactly once, in order; a cursor
older than the log keeps is told to start again from the current state.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
import httpx
import pytest
from httpx_sse import aconnect_sse

from service.clock import ManualClock
from service.config import Settings
from service.domain.events import EventFilter
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.event_streams import CutReader, Node, churn, next_item
from tests.flows import PHONE, connected
from tests.status_details import error_info
from tests.test_http_api import API

UPDATED, DELETED, MESSAGE = (
    pb.EVENT_TYPE_SESSION_UPDATED,
    pb.EVENT_TYPE_SESSION_DELETED,
    pb.EVENT_TYPE_MESSAGE_UPDATED,
)


def node_of(harness: Harness) -> Node:
    return Node(harness.sessions, harness.simulator)


async def test_every_committed_change_appends_one_event_in_commit_order(harness: Harness) -> None:
    await connected(harness, "sender_1")
    sent = await harness.sessions.Send(
        pb.SendRequest(instance_id="sender_1", to="+5491100000000", text="hola")
    )
    ids = {"instance_id": "sender_1", "message_id": sent.message_id}
    await harness.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))
    await harness.simulator.ReadMessage(sim.ReadMessageRequest(**ids))
    await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_1"))
    await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="sender_1"))

    page = await harness.running.store.read_events(0, 100)
    events = page.events
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert page.last == len(events)
    assert len({e.id for e in events}) == len(events)
    assert all(re.fullmatch(r"evt_[0-9a-f]{32}", e.id) for e in events)
    described = [(e.type, e.previous_status, e.status) for e in events]
    assert described == [
        ("session.updated", None, "init"),
        ("session.updated", "init", "qr_required"),
        ("session.updated", "qr_required", "connecting"),
        ("session.updated", "connecting", "connected"),
        ("message.updated", None, None),
        ("message.updated", None, None),
        ("message.updated", None, None),
        ("message.updated", None, None),
        ("session.updated", "connected", "disconnected"),
        ("session.deleted", "disconnected", "disconnected"),
    ]
    sessions = [json.loads(e.data) for e in events if e.type != "message.updated"]
    assert [body["revision"] for body in sessions] == [1, 2, 3, 4, 5, 5]
    messages = [json.loads(e.data) for e in events if e.type == "message.updated"]
    assert [m["status"] for m in messages] == ["pending", "sent", "delivered", "read"]
    assert {m["message_id"] for m in messages} == {sent.message_id}
    assert messages[-1]["delivered_at"] is not None
    assert messages[-1]["read_at"] is not None


async def test_a_stream_starts_with_the_current_state_then_each_event(harness: Harness) -> None:
    await connected(harness, "sender_1")
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_2"))
    stream = harness.sessions.WatchSessions(pb.WatchSessionsRequest())
    first, second, checkpoint = [await next_item(stream) for _ in range(3)]
    assert [first.session.instance_id, second.session.instance_id] == ["sender_1", "sender_2"]
    assert first.session.status == s.SESSION_STATUS_CONNECTED
    log = await harness.running.store.log_position()
    assert checkpoint.checkpoint.sequence == log.last
    await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_2"))
    event = (await next_item(stream)).event
    assert (event.sequence, event.type) == (log.last + 1, UPDATED)
    assert event.session.status == s.SESSION_STATUS_QR_REQUIRED
    assert event.session.revision == 2
    stream.cancel()


async def test_a_stream_filtered_by_status_sees_sessions_enter_and_leave_it(
    harness: Harness,
) -> None:
    await connected(harness, "sender_1")
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_2"))
    request = pb.WatchSessionsRequest(status=s.SESSION_STATUS_CONNECTED)
    stream = harness.sessions.WatchSessions(request)
    state = await next_item(stream)
    assert state.session.instance_id == "sender_1"
    assert (await next_item(stream)).WhichOneof("item") == "checkpoint"
    await harness.simulator.DropNetwork(
        sim.DropNetworkRequest(instance_id="sender_1", hold_reconnect=True)
    )
    await harness.simulator.CompleteHandshake(sim.CompleteHandshakeRequest(instance_id="sender_1"))
    await harness.sessions.Send(
        pb.SendRequest(instance_id="sender_1", to="+5491100000000", text="hola")
    )
    await connected(harness, "sender_3")
    seen = []
    for _ in range(3):
        event = (await next_item(stream)).event
        seen.append((event.session.instance_id, event.session.status))
    # Out of connected, back in (connecting in between is not about it), then sender_3 in;
    # the message events, sender_2 (init) and sender_3's way to connected are left out.
    assert seen == [
        ("sender_1", s.SESSION_STATUS_DISCONNECTED),
        ("sender_1", s.SESSION_STATUS_CONNECTED),
        ("sender_3", s.SESSION_STATUS_CONNECTED),
    ]
    stream.cancel()


@pytest.mark.parametrize(
    ("request_", "selected"),
    [
        (pb.WatchSessionsRequest(), EventFilter()),
        (
            pb.WatchSessionsRequest(types=[MESSAGE, DELETED], instance_id_prefix="s00"),
            EventFilter(
                instance_id_prefix="s00", types=frozenset({"message.updated", "session.deleted"})
            ),
        ),
    ],
    ids=["everything", "filtered"],
)
async def test_a_stream_cut_at_random_points_resumes_every_event_once_in_order(
    harness: Harness, request_: pb.WatchSessionsRequest, selected: EventFilter
) -> None:
    """The writer and the reader run together; the reader hangs up at random points and
    resumes after its cursor. Small queues make it fall behind and read the log itself."""
    harness.running.manager.events.buffer = 4
    rng = random.Random(19)
    reader = CutReader(rng, request_)
    node = node_of(harness)
    await reader.read(node, lambda: False, most=1)  # the current state, then its checkpoint
    while reader.cursor is None:
        await reader.read(node, lambda: reader.cursor is not None)
    start = reader.cursor
    writer = asyncio.create_task(churn([node], 12, rng))

    async def follow() -> None:
        while True:
            await reader.read(node, lambda: False)

    following = asyncio.create_task(follow())
    await writer
    following.cancel()  # one more cut, wherever it falls
    await asyncio.gather(following, return_exceptions=True)
    log = await harness.running.store.read_events(start, 10_000)
    expected = [event.sequence for event in log.events if selected.matches(event)]
    while reader.events[-1:] != expected[-1:]:
        await reader.read(node, lambda: reader.events[-1:] == expected[-1:])
    assert reader.events == expected
    assert len(expected) > 40
    assert reader.connections > 5
    print(f"{len(expected)} events over {reader.connections} connections")


async def test_a_reader_that_falls_behind_reads_the_log_and_misses_nothing(
    harness: Harness,
) -> None:
    """A stream whose queue overflows stops being offered events and reads them from the
    log itself: memory stays bounded, and it still gets every event once, in order."""
    streams = harness.running.manager.events
    streams.buffer = 4
    opened = await streams.open(EventFilter(), None)
    await churn([node_of(harness)], 6, random.Random(7))
    last = (await harness.running.store.log_position()).last
    assert last - opened.position > 3 * streams.buffer
    stream = opened.stream
    assert stream.position < last  # it stopped being offered events: it fell behind
    received = [
        (await asyncio.wait_for(stream.next(), 10)).sequence for _ in range(last - opened.position)
    ]
    assert received == list(range(opened.position + 1, last + 1))
    streams.close(stream)


async def test_a_cursor_past_the_end_of_the_log_is_refused(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_1"))
    stream = harness.sessions.WatchSessions(pb.WatchSessionsRequest(after_sequence=2))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await next_item(stream)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["field"] == "after_sequence"


# Retention.

KEEP = 3600.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, event_retention=KEEP)


async def advance_until(
    harness: Harness, done: Callable[[], Awaitable[bool]], within: float = 15.0
) -> None:
    """Move the manual clock a retention round at a time until ``done()`` holds."""
    deadline = time.monotonic() + within
    while not await done():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await harness.clock.advance(KEEP / 4)
        await asyncio.sleep(0.02)


async def test_retention_trims_the_log_and_an_old_cursor_is_told_to_start_over(
    harness: Harness,
) -> None:
    store = harness.running.store
    await connected(harness, "sender_1")
    old = (await store.log_position()).last
    await harness.clock.advance(KEEP + 1)
    await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_1"))

    async def trimmed() -> bool:
        return (await store.log_position()).trimmed == old

    await advance_until(harness, trimmed)
    kept = await store.read_events(0, 100)
    assert [e.sequence for e in kept.events] == [old + 1]  # younger than the retention

    for cursor in (0, old - 1):
        stream = harness.sessions.WatchSessions(pb.WatchSessionsRequest(after_sequence=cursor))
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await next_item(stream)
        assert expired.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(expired.value)
        assert info.reason == "CURSOR_EXPIRED"
        assert info.metadata == {"after_sequence": str(cursor), "trimmed_through": str(old)}
        assert "start again without a cursor, from the current state" in str(
            expired.value.details()
        )

    resumed = harness.sessions.WatchSessions(pb.WatchSessionsRequest(after_sequence=old))
    assert (await next_item(resumed)).event.sequence == old + 1
    resumed.cancel()
    fresh = harness.sessions.WatchSessions(pb.WatchSessionsRequest())
    assert (await next_item(fresh)).session.status == s.SESSION_STATUS_DISCONNECTED
    fresh.cancel()

    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        gone = await http.get("/events", headers={"Last-Event-ID": "0"})
        assert gone.status_code == 410
        assert gone.json()["code"] == "CURSOR_EXPIRED"
        assert "from the current state" in gone.json()["message"]


# Over HTTP.


async def test_the_sse_stream_resumes_with_last_event_id(harness: Harness) -> None:
    await connected(harness, "sender_1")
    async with httpx.AsyncClient(base_url=harness.http_url + API, timeout=10) as http:
        async with aconnect_sse(http, "GET", "/events") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            items = source.aiter_sse()
            assert (await anext(items)).retry == 2000
            state = await anext(items)
            assert (state.event, state.id) == ("session", "")
            assert json.loads(state.data)["phone_number"] == PHONE
            checkpoint = await anext(items)
            assert checkpoint.event == "checkpoint"
            assert json.loads(checkpoint.data) == {"sequence": int(checkpoint.id)}
            last_id = checkpoint.id
        await harness.simulator.DropNetwork(sim.DropNetworkRequest(instance_id="sender_1"))
        await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="sender_1"))
        headers = {"Last-Event-ID": last_id}
        async with aconnect_sse(http, "GET", "/events", headers=headers) as source:
            items = source.aiter_sse()
            assert (await anext(items)).retry == 2000
            received = [await anext(items) for _ in range(4)]
    assert [int(item.id) for item in received] == list(range(int(last_id) + 1, int(last_id) + 5))
    assert [item.event for item in received] == ["session.updated"] * 3 + ["session.deleted"]
    bodies = [json.loads(item.data) for item in received]
    assert [body["sequence"] for body in bodies] == [int(item.id) for item in received]
    assert [body["session"]["status"] for body in bodies] == [
        "disconnected",
        "connecting",
        "connected",
        "connected",
    ]
    assert all(re.fullmatch(r"evt_[0-9a-f]{32}", body["id"]) for body in bodies)


async def test_a_restarted_server_resumes_a_stream_from_the_same_log(settings: Settings) -> None:
    first = await start_harness(settings, ManualClock())
    try:
        await connected(first, "sender_1")
        cursor = (await first.running.store.log_position()).last
    finally:
        await first.stop()
    again = await start_harness(settings, ManualClock())
    try:
        # A restart reconnects the paired device by itself: connecting, then connected.
        stream = again.sessions.WatchSessions(pb.WatchSessionsRequest(after_sequence=cursor))
        statuses = [(await next_item(stream)).event for _ in range(2)]
        assert [e.sequence for e in statuses] == [cursor + 1, cursor + 2]
        assert [e.session.status for e in statuses] == [
            s.SESSION_STATUS_CONNECTING,
            s.SESSION_STATUS_CONNECTED,
        ]
        stream.cancel()
    finally:
        await again.stop()


async def test_an_idle_filtered_stream_says_how_far_it_has_read(settings: Settings) -> None:
    """A stream that looked past events it does not carry sends a checkpoint once idle, so
    that its reader's cursor keeps up with the log (and never falls out of its retention)."""
    running = await start_harness(replace(settings, sse_keepalive=0.1), ManualClock())
    try:
        only_messages = pb.WatchSessionsRequest(types=[MESSAGE])
        stream = running.sessions.WatchSessions(only_messages)
        start = (await next_item(stream)).checkpoint.sequence
        await running.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_1"))
        await running.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_1"))
        checkpoint = await next_item(stream)
        assert checkpoint.WhichOneof("item") == "checkpoint"
        assert checkpoint.checkpoint.sequence == start + 2
        stream.cancel()
        async with httpx.AsyncClient(base_url=running.http_url + API, timeout=10) as http:
            headers = {"Last-Event-ID": str(start)}
            query = {"types": "message.updated"}
            async with aconnect_sse(http, "GET", "/events", params=query, headers=headers) as sse:
                items = sse.aiter_sse()
                assert (await anext(items)).retry == 2000
                idle = await anext(items)
        assert (idle.event, idle.id) == ("checkpoint", str(start + 2))
    finally:
        await running.stop()
