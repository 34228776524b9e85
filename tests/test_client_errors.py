"""Every contract error reaches Central Hub as its own exception, against a real server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import engine_service_pb2 as engine_pb
from sessionmanager_client import errors
from sessionmanager_client.aio import AsyncSessionManagerClient
from tests.conftest import Harness, start_harness


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[AsyncSessionManagerClient]:
    async with AsyncSessionManagerClient(harness.address, timeout=5) as client:
        yield client


async def connected(client: AsyncSessionManagerClient, iid: str) -> None:
    await client.create_session(iid)
    await client.request_qr(iid)
    await client.simulator.scan_qr(iid, "+5491122334455")


def test_one_class_per_reason() -> None:
    from sessionmanager.v1 import session_pb2

    reasons = {
        name.removeprefix("ERROR_REASON_")
        for name, number in session_pb2.ErrorReason.items()
        if number != 0
    }
    assert set(errors.REASONS) == reasons
    assert len(set(errors.REASONS.values())) == len(errors.REASONS)
    for cls in errors.REASONS.values():
        assert issubclass(cls, errors.SessionManagerClientError)


async def test_session_not_found(client: AsyncSessionManagerClient) -> None:
    with pytest.raises(errors.SessionNotFoundError) as caught:
        await client.get_session("sender_404")
    assert caught.value.reason == "SESSION_NOT_FOUND"
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.instance_id == "sender_404"
    assert "sender_404" in caught.value.message


async def test_invalid_instance_id(client: AsyncSessionManagerClient) -> None:
    with pytest.raises(errors.InvalidInstanceIdError) as caught:
        await client.create_session("not valid!")
    assert caught.value.reason == "INVALID_INSTANCE_ID"
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_invalid_argument(client: AsyncSessionManagerClient) -> None:
    await connected(client, "sender_1")
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.send("sender_1", "+5491100000000", "")
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert caught.value.field == "text"
    with pytest.raises(errors.InvalidArgumentError) as listing:
        await client.list_sessions(page_size=5000)
    assert listing.value.field == "page_size"


async def test_session_already_exists(client: AsyncSessionManagerClient) -> None:
    await client.create_session("sender_1")
    with pytest.raises(errors.SessionAlreadyExistsError) as caught:
        await client.create_session("sender_1")
    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS


async def test_session_already_connected(client: AsyncSessionManagerClient) -> None:
    await connected(client, "sender_1")
    with pytest.raises(errors.SessionAlreadyConnectedError) as caught:
        await client.request_qr("sender_1")
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.status == "connected"


async def test_session_not_connected_carries_status(client: AsyncSessionManagerClient) -> None:
    await client.create_session("sender_1")
    with pytest.raises(errors.SessionNotConnectedError) as caught:
        await client.send("sender_1", "+5491100000000", "hola")
    assert caught.value.status == "init"
    await client.request_qr("sender_1")
    with pytest.raises(errors.SessionNotConnectedError) as again:
        await client.send("sender_1", "+5491100000000", "hola")
    assert again.value.status == "qr_required"


async def test_qr_not_available_while_connecting(client: AsyncSessionManagerClient) -> None:
    await client.create_session("sender_1")
    await client.request_qr("sender_1")
    held = await client.simulator.scan_qr("sender_1", hold_handshake=True)
    assert held.status == 2  # connecting
    with pytest.raises(errors.QRNotAvailableError) as caught:
        await client.request_qr("sender_1")
    assert caught.value.status == "connecting"


async def test_qr_generation_failed(client: AsyncSessionManagerClient) -> None:
    await client.create_session("sender_1")
    await client.simulator.inject_fault("sender_1", "pairing")
    with pytest.raises(errors.QRGenerationFailedError) as caught:
        await client.request_qr("sender_1")
    assert caught.value.code is grpc.StatusCode.INTERNAL


async def test_whatsapp_error(client: AsyncSessionManagerClient) -> None:
    await connected(client, "sender_1")
    await client.simulator.inject_fault("sender_1", "send")
    with pytest.raises(errors.WhatsAppError) as caught:
        await client.send("sender_1", "+5491100000000", "hola", idempotency_key="k1")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    # A WHATSAPP_ERROR is UNAVAILABLE too, but it is not "server unreachable".
    assert not isinstance(caught.value, errors.SessionManagerUnavailableError)


async def test_session_manager_error(
    client: AsyncSessionManagerClient, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(instance_id: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(harness.running.manager, "get", broken)
    with pytest.raises(errors.SessionManagerError) as caught:
        await client.get_session("sender_1")
    assert caught.value.reason == "SESSION_MANAGER_ERROR"
    assert caught.value.code is grpc.StatusCode.INTERNAL


async def test_invalid_transition(client: AsyncSessionManagerClient, harness: Harness) -> None:
    # Only EngineService returns it, so the engine's stub makes the call; the
    # client's mapping turns the RpcError into the exception.
    await client.create_session("sender_1")
    with pytest.raises(grpc.RpcError) as raw:
        await harness.engine.ReportConnected(
            engine_pb.ReportConnectedRequest(instance_id="sender_1", phone_number="+5491122334455")
        )
    mapped = errors.from_rpc_error(raw.value)
    assert isinstance(mapped, errors.InvalidTransitionError)
    assert mapped.status == "init"


async def test_timeout(
    client: AsyncSessionManagerClient, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(instance_id: str) -> None:
        await asyncio.Event().wait()  # never answers: only the deadline ends the call

    monkeypatch.setattr(harness.running.manager, "request_qr", slow)
    await client.create_session("sender_1")
    with pytest.raises(errors.SessionManagerTimeoutError) as caught:
        await client.request_qr("sender_1", timeout=0.2)
    assert caught.value.reason is None
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED

    # The client's default deadline applies when a call names none.
    async with AsyncSessionManagerClient(harness.address, timeout=0.2) as short:
        with pytest.raises(errors.SessionManagerTimeoutError):
            await short.request_qr("sender_1")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("retry", [False, True])
async def test_unavailable(retry: bool) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    async with AsyncSessionManagerClient(address, timeout=5, retry=retry) as client:
        with pytest.raises(errors.SessionManagerUnavailableError) as caught:
            await client.get_session("sender_1")
    assert caught.value.reason is None
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_error_without_error_info_keeps_code() -> None:
    class Fake(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self) -> str:
            return "nope"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    mapped = errors.from_rpc_error(Fake())
    assert type(mapped) is errors.SessionManagerClientError
    assert mapped.code is grpc.StatusCode.PERMISSION_DENIED
    assert mapped.message == "nope"


async def test_tokens(settings: Settings) -> None:
    secured = replace(settings, public_tokens=(b"pub",), internal_tokens=(b"int",))
    harness = await start_harness(secured, ManualClock())
    try:
        async with AsyncSessionManagerClient(harness.address, timeout=5) as anonymous:
            with pytest.raises(errors.UnauthenticatedError) as caught:
                await anonymous.create_session("sender_1")
            assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
        async with AsyncSessionManagerClient(harness.address, timeout=5, token="pub") as client:
            await client.create_session("sender_1")
            with pytest.raises(errors.PermissionDeniedError):
                await client.simulator.fail_session("sender_1")
        async with AsyncSessionManagerClient(
            harness.address, timeout=5, token="pub", simulator_token="int"
        ) as client:
            failed = await client.simulator.fail_session("sender_1")
            assert failed.last_error_code == "TEMPORARY_BAN"
    finally:
        await harness.stop()
