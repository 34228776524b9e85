"""WhatsApp's receipts: a sent message moves forward only, and each move is an event.

``pending → sent → delivered → read``, or ``failed`` (after it was sent, too);
a late receipt never moves a message back. GetMessage and the HTTP route read
it; the simulated phone delivers and reads, in the server and in a worker.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import grpc
import httpx
import jsonschema
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.domain.contract import DELIVERED
from service.domain.receipts import MessageReceipt
from service.domain.states import SessionRef
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness
from tests.event_streams import next_item
from tests.flows import connected
from tests.status_details import error_info
from tests.test_http_api import API, ok

TO = "+5491100000000"


async def send(harness: Harness, iid: str = "sender_1") -> pb.SendResponse:
    return await harness.sessions.Send(pb.SendRequest(instance_id=iid, to=TO, text="hola"))


async def status_of(harness: Harness, message_id: str, iid: str = "sender_1") -> int:
    request = pb.GetMessageRequest(instance_id=iid, message_id=message_id)
    return (await harness.sessions.GetMessage(request)).message.status


async def message_events(harness: Harness, after: int) -> list[str]:
    """The statuses the log's message events carry after the sequence number ``after``."""
    page = await harness.running.store.read_events(after, 1000)
    return [json.loads(e.data)["status"] for e in page.events if e.type == "message.updated"]


async def test_receipts_move_a_message_forward_and_never_back(harness: Harness) -> None:
    await connected(harness, "sender_1")
    before = (await harness.running.store.log_position()).last
    sent = await send(harness)
    ids = {"instance_id": "sender_1", "message_id": sent.message_id}
    got = (await harness.sessions.GetMessage(pb.GetMessageRequest(**ids))).message
    assert (got.status, got.whatsapp_message_id) == (
        pb.MESSAGE_STATUS_SENT,
        sent.whatsapp_message_id,
    )
    assert not got.HasField("delivered_at")

    delivered = (await harness.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))).message
    assert delivered.status == pb.MESSAGE_STATUS_DELIVERED
    assert delivered.HasField("delivered_at")
    read = (await harness.simulator.ReadMessage(sim.ReadMessageRequest(**ids))).message
    assert read.status == pb.MESSAGE_STATUS_READ
    assert read.HasField("read_at")
    assert read.delivered_at == delivered.delivered_at
    moved = (await harness.running.store.log_position()).last

    # A late delivery receipt, or a failure after the message was read, changes nothing.
    late = (await harness.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))).message
    assert late == read
    failed = (await harness.simulator.FailMessage(sim.FailMessageRequest(**ids))).message
    assert failed == read
    assert (await harness.running.store.log_position()).last == moved

    assert await message_events(harness, before) == ["pending", "sent", "delivered", "read"]


async def test_a_message_refused_after_it_was_sent_fails_for_good(harness: Harness) -> None:
    await connected(harness, "sender_1")
    sent = await send(harness)
    ids = {"instance_id": "sender_1", "message_id": sent.message_id}
    failed = (
        await harness.simulator.FailMessage(
            sim.FailMessageRequest(**ids, code="SERVER_ERROR", message="The recipient is gone")
        )
    ).message
    assert failed.status == pb.MESSAGE_STATUS_FAILED
    assert (failed.error_code, failed.error_message) == ("SERVER_ERROR", "The recipient is gone")
    later = (await harness.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))).message
    assert later == failed


async def test_each_receipt_reaches_a_list_wide_stream(harness: Harness) -> None:
    await connected(harness, "sender_1")
    types = [pb.EVENT_TYPE_MESSAGE_UPDATED]
    stream = harness.sessions.WatchSessions(pb.WatchSessionsRequest(types=types))
    assert (await next_item(stream)).WhichOneof("item") == "checkpoint"  # no session in the state
    sent = await send(harness)
    ids = {"instance_id": "sender_1", "message_id": sent.message_id}
    await harness.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))
    await harness.simulator.ReadMessage(sim.ReadMessageRequest(**ids))
    messages = [(await next_item(stream)).event.message for _ in range(4)]
    assert [m.status for m in messages] == [
        pb.MESSAGE_STATUS_PENDING,
        pb.MESSAGE_STATUS_SENT,
        pb.MESSAGE_STATUS_DELIVERED,
        pb.MESSAGE_STATUS_READ,
    ]
    assert {m.message_id for m in messages} == {sent.message_id}
    stream.cancel()


async def test_a_receipt_that_overtakes_its_outcome_is_applied_once_the_outcome_is_stored(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WhatsApp's delivery receipt can reach the server before the send's outcome is stored
    (the outcome stores the WhatsApp id the receipt names): it is not lost."""
    await connected(harness, "sender_1")
    manager = harness.running.manager
    engine = manager.engine
    send_for_real = engine.send

    async def receipt_first(session: SessionRef, to: str, text: str) -> str:
        whatsapp_id = await send_for_real(session, to, text)
        receipt = MessageReceipt((whatsapp_id,), DELIVERED, harness.clock.now())
        await manager.report(session, receipt)  # before the outcome: it moves nothing yet
        return whatsapp_id

    monkeypatch.setattr(engine, "send", receipt_first)
    before = (await harness.running.store.log_position()).last
    sent = await send(harness)
    assert sent.status == pb.MESSAGE_STATUS_SENT

    request = pb.WatchSessionsRequest(after_sequence=before, types=[pb.EVENT_TYPE_MESSAGE_UPDATED])
    stream = harness.sessions.WatchSessions(request)
    moves = [(await next_item(stream)).event.message for _ in range(3)]
    stream.cancel()
    assert [m.status for m in moves] == [
        pb.MESSAGE_STATUS_PENDING,
        pb.MESSAGE_STATUS_SENT,
        pb.MESSAGE_STATUS_DELIVERED,
    ]
    assert await status_of(harness, sent.message_id) == pb.MESSAGE_STATUS_DELIVERED


async def test_get_message_over_http_and_its_errors(harness: Harness) -> None:
    await connected(harness, "sender_1")
    await connected(harness, "sender_2")
    sent = await send(harness)
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        document = ok(await http.get("/openapi.json"))
        schema = {"$ref": "#/components/schemas/MessageJSON", **document}
        body: dict[str, Any] = ok(await http.get(f"/sessions/sender_1/messages/{sent.message_id}"))
        jsonschema.validate(body, schema)
        assert body["status"] == "sent"
        assert body["to"] == TO
        assert body["whatsapp_message_id"] == sent.whatsapp_message_id
        assert body["delivered_at"] is None
        await harness.simulator.ReadMessage(
            sim.ReadMessageRequest(instance_id="sender_1", message_id=sent.message_id)
        )
        read = ok(await http.get(f"/sessions/sender_1/messages/{sent.message_id}"))
        assert read["status"] == "read"
        assert read["read_at"] == read["delivered_at"]  # a read receipt implies delivery

        elsewhere = await http.get(f"/sessions/sender_2/messages/{sent.message_id}")
        assert elsewhere.status_code == 404
        assert elsewhere.json()["code"] == "MESSAGE_NOT_FOUND"
        assert elsewhere.json()["details"]["message_id"] == sent.message_id
        nobody = await http.get(f"/sessions/nobody/messages/{sent.message_id}")
        assert nobody.json()["code"] == "SESSION_NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await status_of(harness, "no-such-message")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(missing.value).reason == "MESSAGE_NOT_FOUND"


async def test_a_message_whatsapp_never_accepted_gets_no_receipt(harness: Harness) -> None:
    await connected(harness, "sender_1")
    await harness.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="sender_1", fault=sim.FAULT_SEND)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(harness)
    message_id = error_info(refused.value).metadata["message_id"]
    assert await status_of(harness, message_id) == pb.MESSAGE_STATUS_FAILED
    with pytest.raises(grpc.aio.AioRpcError) as no_receipt:
        await harness.simulator.DeliverMessage(
            sim.DeliverMessageRequest(instance_id="sender_1", message_id=message_id)
        )
    assert error_info(no_receipt.value).reason == "INVALID_TRANSITION"


async def test_receipts_come_through_the_worker_protocol(settings: Settings) -> None:
    """With the simulated phone in a worker process, receipts travel as worker frames."""
    running = await start_harness(replace(settings, engine="simulated-worker"), ManualClock())
    try:
        await connected(running, "sender_1")
        sent = await send(running)
        ids = {"instance_id": "sender_1", "message_id": sent.message_id}
        delivered = (
            await running.simulator.DeliverMessage(sim.DeliverMessageRequest(**ids))
        ).message
        assert delivered.status == pb.MESSAGE_STATUS_DELIVERED
        read = (await running.simulator.ReadMessage(sim.ReadMessageRequest(**ids))).message
        assert read.status == pb.MESSAGE_STATUS_READ
        assert read.HasField("delivered_at")
    finally:
        await running.stop()
