"""A session's live events over Server-Sent Events, read as a browser's EventSource would.

The simulated phone scans, connects, drops and unlinks while a reader follows
the stream; a reader that does not read is coalesced to the latest state;
deleting the session and stopping the server end the stream with ``end``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import jsonschema
import pytest
from google.protobuf import timestamp_pb2
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import engine_service_pb2 as engine_pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.test_http_api import API, ok

TIMEOUT = 10


class Stream:
    """An open event stream, read in the background into a queue."""

    def __init__(self, events: AsyncIterator[ServerSentEvent]) -> None:
        self._events = events
        self._queue: asyncio.Queue[ServerSentEvent | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self._events:
                await self._queue.put(event)
        finally:
            await self._queue.put(None)  # the stream ended

    async def next(self) -> ServerSentEvent | None:
        async with asyncio.timeout(TIMEOUT):
            return await self._queue.get()

    async def session(self) -> dict[str, Any]:
        event = await self.next()
        assert event is not None, "the stream ended"
        assert event.event == "session", event
        body: dict[str, Any] = json.loads(event.data)
        assert event.id == str(body["revision"])
        return body

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@asynccontextmanager
async def events(client: httpx.AsyncClient, iid: str) -> AsyncIterator[Stream]:
    async with aconnect_sse(client, "GET", f"{API}/sessions/{iid}/events") as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["cache-control"] == "no-cache"
        stream = Stream(source.aiter_sse())
        first = await stream.next()
        assert first is not None
        assert (first.retry, first.data) == (2000, "")  # `retry: 2000` comes first
        try:
            yield stream
        finally:
            await stream.close()


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.http_url, timeout=TIMEOUT) as http:
        yield http


async def _session_schema(client: httpx.AsyncClient) -> dict[str, Any]:
    document = ok(await client.get("/openapi.json"))
    return {"$ref": "#/components/schemas/SessionJSON", **document}


async def test_a_reader_sees_every_state_in_order(
    harness: Harness, client: httpx.AsyncClient
) -> None:
    schema = await _session_schema(client)
    ok(await client.post(f"{API}/sessions", json={"instance_id": "sender_51"}), 201)
    phone = harness.simulator
    seen: list[tuple[str, str]] = []
    async with events(client, "sender_51") as stream:

        async def expect(count: int) -> None:
            for _ in range(count):
                state = await stream.session()
                jsonschema.validate(state, schema)
                assert state["revision"] == len(seen) + 1
                seen.append((state["status"], state["qr_status"]))

        await expect(1)
        ok(await client.post(f"{API}/sessions/sender_51/qr"))
        await expect(1)
        await phone.ScanQR(sim.ScanQRRequest(instance_id="sender_51", hold_handshake=True))
        await expect(1)
        await phone.CompleteHandshake(sim.CompleteHandshakeRequest(instance_id="sender_51"))
        await expect(1)
        await phone.DropNetwork(sim.DropNetworkRequest(instance_id="sender_51"))
        await expect(3)
        await phone.UnlinkDevice(sim.UnlinkDeviceRequest(instance_id="sender_51"))
        await expect(1)
        assert seen == [
            ("init", "none"),
            ("qr_required", "generated"),
            ("connecting", "used"),
            ("connected", "none"),
            ("disconnected", "none"),
            ("connecting", "none"),
            ("connected", "none"),
            ("disconnected", "none"),
        ]

        # A reconnecting EventSource simply gets the current state again.
        async with events(client, "sender_51") as again:
            assert await again.session() == ok(await client.get(f"{API}/sessions/sender_51"))

        assert (await client.delete(f"{API}/sessions/sender_51")).status_code == 204
        end = await stream.next()
        assert end is not None
        assert end.event == "end"
        assert json.loads(end.data) == {
            "reason": "deleted",
            "message": "session 'sender_51' was deleted",
        }
        assert await stream.next() is None  # and the stream closes
    assert harness.running.manager.watcher_count() == 0


async def test_a_stream_of_an_unknown_session_is_a_json_error(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{API}/sessions/nobody/events")
    assert response.status_code == 404
    assert response.json()["code"] == "SESSION_NOT_FOUND"


async def test_head_of_a_stream_opens_no_watch(harness: Harness, client: httpx.AsyncClient) -> None:
    ok(await client.post(f"{API}/sessions", json={"instance_id": "sender_51"}), 201)
    head = await client.head(f"{API}/sessions/sender_51/events")
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("text/event-stream")
    assert harness.running.manager.watcher_count() == 0
    assert (await client.head(f"{API}/sessions/nobody/events")).status_code == 404


async def test_idle_streams_get_keep_alive_comments(settings: Settings) -> None:
    running = await start_harness(replace(settings, sse_keepalive=0.05), ManualClock())
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=TIMEOUT) as http:
            ok(await http.post(f"{API}/sessions", json={"instance_id": "quiet"}), 201)
            async with http.stream("GET", f"{API}/sessions/quiet/events") as response:
                lines: list[str] = []
                async with asyncio.timeout(TIMEOUT):
                    async for line in response.aiter_lines():
                        lines.append(line)
                        if lines.count(": keep-alive") == 2:
                            break
        assert lines[:4] == ["retry: 2000", "", "id: 1", "event: session"]
        assert lines[4].startswith("data: {")
        assert lines[5:] == ["", ": keep-alive", "", ": keep-alive"]
    finally:
        await running.stop()


async def test_a_reader_that_does_not_read_skips_to_the_latest_state(
    harness: Harness,
) -> None:
    """Changes pile up while the reader's socket is full; it then gets the latest, in order.

    Both ends get small socket buffers, so that the stream stops being written
    after a few events, as it does for a reader on a slow network.
    """
    codes = 60  # each a new QR code: a commit and an event of 3 KiB, 180 KiB in all
    http = harness.running.http
    assert http is not None
    http._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited on accept
    small = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    async with (
        httpx.AsyncClient(base_url=harness.http_url, timeout=TIMEOUT) as control,
        httpx.AsyncClient(base_url=harness.http_url, timeout=TIMEOUT, transport=small) as slow,
    ):
        ok(await control.post(f"{API}/sessions", json={"instance_id": "busy"}), 201)
        ok(await control.post(f"{API}/sessions/busy/qr"))
        async with slow.stream("GET", f"{API}/sessions/busy/events") as response:
            assert response.status_code == 200
            expires_at = timestamp_pb2.Timestamp()
            expires_at.FromDatetime(harness.clock.now() + timedelta(seconds=60))
            for serial in range(codes):
                await harness.engine.ReportQRCode(
                    engine_pb.ReportQRCodeRequest(
                        instance_id="busy",
                        code=f"2@{serial:04d}" + "x" * 600,
                        expires_at=expires_at,
                    )
                )
            latest = ok(await control.get(f"{API}/sessions/busy"))
            # Now read at full speed: open the reader's window wide.
            reader = response.extensions["network_stream"].get_extra_info("socket")
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            revisions: list[int] = []
            decoder = _events(response)
            async with asyncio.timeout(TIMEOUT):
                while not revisions or revisions[-1] < latest["revision"]:
                    event = await anext(decoder)
                    revisions.append(int(event.id))
            assert event.data == json.dumps(latest, separators=(",", ":"), ensure_ascii=False)
    assert revisions == sorted(set(revisions))
    assert revisions[0] == 2  # the state when the stream opened
    changes = latest["revision"] - revisions[0]
    assert changes == codes
    assert len(revisions) - 1 < changes, "the reader was not coalesced"
    print(f"a reader that stalled got {len(revisions) - 1} events for {changes} changes")


async def _events(response: httpx.Response) -> AsyncIterator[ServerSentEvent]:
    async for event in EventSource(response).aiter_sse():
        if event.event == "session":
            yield event


async def test_stopping_the_server_ends_every_stream_with_a_final_event(
    settings: Settings,
) -> None:
    running = await start_harness(settings, ManualClock())
    stopped = False
    try:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=TIMEOUT) as http:
            for iid in ("one", "two"):
                ok(await http.post(f"{API}/sessions", json={"instance_id": iid}), 201)
            async with events(http, "one") as first, events(http, "two") as second:
                for stream in (first, second):
                    assert (await stream.session())["revision"] == 1
                stopping = asyncio.create_task(running.stop())
                for stream in (first, second):
                    end = await stream.next()
                    assert end is not None
                    assert end.event == "end"
                    assert json.loads(end.data) == {
                        "reason": "shutdown",
                        "message": "the Session Manager is shutting down",
                    }
                    assert await stream.next() is None
                async with asyncio.timeout(TIMEOUT):
                    await stopping
                stopped = True
            with pytest.raises(httpx.ConnectError):
                await http.get("/health")
    finally:
        if not stopped:
            await running.stop()
