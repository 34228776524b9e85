"""Every row of the contract's lifecycle table, and every error, through gRPC.

The simulated engine plays the phone (SimulatorService) and the engine side
reports through EngineService, exactly as a real engine would. QR lifetimes
are driven by the manual clock: no test sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from service.engine.port import EngineError
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness
from tests.status_details import error_info, next_state

PHONE = "+5491122334455"


async def _fails(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> dict[str, str]:
    """Await the call; it must fail with ``code`` and one ErrorInfo ``reason``."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert failure.value.code() == code, failure.value.details()
    info = error_info(failure.value)
    assert info.reason == reason
    assert info.domain == "sessionmanager.v1"
    return dict(info.metadata)


async def _create(h: Harness, iid: str) -> s.WhatsAppSession:
    return (await h.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))).session


async def _get(h: Harness, iid: str) -> s.WhatsAppSession:
    return (await h.sessions.GetSession(pb.GetSessionRequest(instance_id=iid))).session


async def _qr(h: Harness, iid: str) -> pb.RequestQRResponse:
    return await h.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))


async def _connected(h: Harness, iid: str) -> s.WhatsAppSession:
    await _create(h, iid)
    await _qr(h, iid)
    return (
        await h.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number=PHONE))
    ).session


async def test_create_is_init_none(harness: Harness) -> None:
    created = await _create(harness, "sender_1")
    assert (created.status, created.qr_status, created.revision) == (
        s.SESSION_STATUS_INIT,
        s.QR_STATUS_NONE,
        1,
    )
    assert created.HasField("created_at")
    assert not created.HasField("qr_string")
    await _fails(
        harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_1")),
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_ALREADY_EXISTS",
    )


@pytest.mark.parametrize("bad", ["", "bad id", "-starts-with-dash", "x" * 65, "ñandú", "a/b"])
async def test_invalid_instance_id_everywhere(harness: Harness, bad: str) -> None:
    for call in (
        harness.sessions.GetSession(pb.GetSessionRequest(instance_id=bad)),
        harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=bad)),
        harness.sessions.RequestQR(pb.RequestQRRequest(instance_id=bad)),
        harness.sessions.Disconnect(pb.DisconnectRequest(instance_id=bad)),
        harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id=bad)),
        harness.engine.ReportConnected(
            engine.ReportConnectedRequest(instance_id=bad, phone_number=PHONE)
        ),
    ):
        await _fails(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INSTANCE_ID")
    listed = await harness.sessions.ListSessions(pb.ListSessionsRequest())
    assert list(listed.sessions) == []


async def test_unknown_session_is_not_found(harness: Harness) -> None:
    for call in (
        harness.sessions.GetSession(pb.GetSessionRequest(instance_id="nobody")),
        harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="nobody")),
        harness.sessions.Send(pb.SendRequest(instance_id="nobody", to=PHONE, text="x")),
        harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="nobody")),
        harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="nobody")),
        harness.engine.ReportQRScanned(engine.ReportQRScannedRequest(instance_id="nobody")),
    ):
        metadata = await _fails(call, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        assert metadata["instance_id"] == "nobody"


async def test_request_qr_shows_a_code_from_every_allowed_status(harness: Harness) -> None:
    # init
    await _create(harness, "from_init")
    first = await _qr(harness, "from_init")
    assert first.session.status == s.SESSION_STATUS_QR_REQUIRED
    assert first.session.qr_status == s.QR_STATUS_GENERATED
    assert first.qr_string.startswith("data:image/png;base64,")
    assert first.qr_expires_at == first.session.qr_expires_at
    # disconnected
    await _connected(harness, "from_disconnected")
    await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="from_disconnected"))
    again = await _qr(harness, "from_disconnected")
    assert again.session.status == s.SESSION_STATUS_QR_REQUIRED
    # error
    await _create(harness, "from_error")
    await harness.simulator.FailSession(sim.FailSessionRequest(instance_id="from_error"))
    recovered = await _qr(harness, "from_error")
    assert recovered.session.qr_status == s.QR_STATUS_GENERATED


async def test_valid_qr_is_returned_unchanged(harness: Harness) -> None:
    await _create(harness, "same")
    first = await _qr(harness, "same")
    await harness.clock.advance(30)
    second = await _qr(harness, "same")
    assert second.qr_string == first.qr_string
    assert second.session.revision == first.session.revision


async def test_expiry_rotation_and_a_new_code_after_expiry(harness: Harness) -> None:
    await _create(harness, "rot")
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="rot"))
    await next_state(watch)
    first = await _qr(harness, "rot")
    assert await next_state(watch) == first.session
    lifetimes, codes = [], {first.qr_string}
    current = first.session
    for _ in range(5):  # whatsmeow shows six codes: 60 s, then 20 s each
        lifetimes.append(
            (current.qr_expires_at.ToDatetime() - current.qr_generated_at.ToDatetime()).seconds
        )
        # The next code comes a second before this one lapses; the lapse then changes nothing.
        # (Two steps: over PostgreSQL the rotation's commit takes real time.)
        expires_at = current.qr_expires_at.ToDatetime(tzinfo=UTC)
        await harness.clock.advance((expires_at - harness.clock.now()).total_seconds() - 1)
        current = await next_state(watch)
        assert current.qr_status == s.QR_STATUS_GENERATED  # rotated before it lapsed
        await harness.clock.advance(1)
        codes.add(current.qr_string)
    lifetimes.append(20)
    assert lifetimes == [60, 20, 20, 20, 20, 20]
    assert len(codes) == 6

    await harness.clock.advance(20)  # the last code lapses: watchers are told at that moment
    expired = await next_state(watch)
    assert expired.status == s.SESSION_STATUS_QR_REQUIRED
    assert expired.qr_status == s.QR_STATUS_EXPIRED
    assert expired.qr_string == current.qr_string  # kept, for a UI to grey out
    assert expired.revision == current.revision + 1

    await _fails(
        harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="rot")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "QR_NOT_AVAILABLE",
    )
    fresh = await _qr(harness, "rot")
    assert fresh.session.qr_status == s.QR_STATUS_GENERATED
    assert fresh.qr_string not in codes
    watch.cancel()


async def test_scan_then_handshake(harness: Harness) -> None:
    await _create(harness, "scan")
    await _qr(harness, "scan")
    held = await harness.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="scan", phone_number=PHONE, hold_handshake=True)
    )
    assert held.session.status == s.SESSION_STATUS_CONNECTING
    assert held.session.qr_status == s.QR_STATUS_USED
    assert not held.session.HasField("qr_string")
    metadata = await _fails(
        _qr(harness, "scan"), grpc.StatusCode.FAILED_PRECONDITION, "QR_NOT_AVAILABLE"
    )
    assert metadata["status"] == "connecting"
    done = await harness.simulator.CompleteHandshake(
        sim.CompleteHandshakeRequest(instance_id="scan")
    )
    assert done.session.status == s.SESSION_STATUS_CONNECTED
    assert done.session.qr_status == s.QR_STATUS_NONE
    assert done.session.phone_number == PHONE
    assert done.session.HasField("connected_at")
    metadata = await _fails(
        _qr(harness, "scan"), grpc.StatusCode.FAILED_PRECONDITION, "SESSION_ALREADY_CONNECTED"
    )
    assert metadata["status"] == "connected"


async def test_engine_reports_connected_from_each_allowed_status(harness: Harness) -> None:
    def report(iid: str) -> Any:
        return harness.engine.ReportConnected(
            engine.ReportConnectedRequest(instance_id=iid, phone_number=PHONE)
        )

    await _create(harness, "qr")
    await _qr(harness, "qr")
    assert (await report("qr")).session.status == s.SESSION_STATUS_CONNECTED

    await _create(harness, "drop")
    await _qr(harness, "drop")
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="drop"))
    await harness.engine.ReportDisconnected(
        engine.ReportDisconnectedRequest(instance_id="drop", reason=s.DISCONNECT_REASON_TIMEOUT)
    )
    back = await report("drop")
    assert back.session.status == s.SESSION_STATUS_CONNECTED
    assert not back.session.HasField("last_error_code")

    await _create(harness, "fresh")
    await _fails(report("fresh"), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
    assert (await _get(harness, "fresh")).revision == 1


async def test_network_drop_reconnects_by_itself_without_qr(harness: Harness) -> None:
    before = await _connected(harness, "net")
    watch = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="net"))
    await next_state(watch)
    await harness.simulator.DropNetwork(sim.DropNetworkRequest(instance_id="net"))
    dropped, reconnecting, back = [await next_state(watch) for _ in range(3)]
    assert dropped.status == s.SESSION_STATUS_DISCONNECTED
    assert dropped.last_error_code == "NETWORK"
    assert dropped.HasField("disconnected_at")
    assert reconnecting.status == s.SESSION_STATUS_CONNECTING
    assert reconnecting.qr_status == s.QR_STATUS_NONE
    assert back.status == s.SESSION_STATUS_CONNECTED
    assert back.qr_status == s.QR_STATUS_NONE
    assert back.phone_number == before.phone_number
    assert back.revision == before.revision + 3
    watch.cancel()


async def test_phone_unlinks_the_device(harness: Harness) -> None:
    await _connected(harness, "unlink")
    gone = await harness.simulator.UnlinkDevice(sim.UnlinkDeviceRequest(instance_id="unlink"))
    assert gone.session.status == s.SESSION_STATUS_DISCONNECTED
    assert gone.session.qr_status == s.QR_STATUS_NONE
    assert gone.session.last_error_code == "LOGOUT"
    new = await _qr(harness, "unlink")  # a new QR is needed
    assert new.session.qr_status == s.QR_STATUS_GENERATED


@pytest.mark.parametrize(
    "setup", ["qr_required", "connecting", "connected", "disconnected", "error"]
)
async def test_disconnect_from_any_status_but_init(harness: Harness, setup: str) -> None:
    iid = f"d_{setup}"
    await _create(harness, iid)
    if setup != "error":
        await _qr(harness, iid)
    if setup in ("connecting", "connected", "disconnected"):
        await harness.simulator.ScanQR(
            sim.ScanQRRequest(instance_id=iid, hold_handshake=setup == "connecting")
        )
    if setup == "disconnected":
        await harness.simulator.DropNetwork(
            sim.DropNetworkRequest(instance_id=iid, hold_reconnect=True)
        )
        await harness.engine.ReportDisconnected(
            engine.ReportDisconnectedRequest(instance_id=iid, reason=s.DISCONNECT_REASON_NETWORK)
        )
    if setup == "error":
        await harness.simulator.FailSession(
            sim.FailSessionRequest(instance_id=iid, code="CLIENT_OUTDATED")
        )
    assert (await _get(harness, iid)).status == getattr(s, f"SESSION_STATUS_{setup.upper()}")
    out = (await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id=iid))).session
    assert (out.status, out.qr_status, out.last_error_code) == (
        s.SESSION_STATUS_DISCONNECTED,
        s.QR_STATUS_NONE,
        "LOGOUT",
    )
    again = (await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id=iid))).session
    assert again.revision == out.revision  # already logged out: nothing changes


async def test_disconnect_on_init_is_not_connected(harness: Harness) -> None:
    await _create(harness, "new")
    metadata = await _fails(
        harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="new")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_NOT_CONNECTED",
    )
    assert metadata["status"] == "init"


@pytest.mark.parametrize("setup", ["init", "qr_required", "connecting", "connected"])
async def test_unrecoverable_fault_from_any_status(harness: Harness, setup: str) -> None:
    iid = f"f_{setup}"
    await _create(harness, iid)
    if setup != "init":
        await _qr(harness, iid)
    if setup in ("connecting", "connected"):
        await harness.simulator.ScanQR(
            sim.ScanQRRequest(instance_id=iid, hold_handshake=setup == "connecting")
        )
    failed = await harness.engine.ReportError(
        engine.ReportErrorRequest(instance_id=iid, code="TEMPORARY_BAN", message="Banned for 24 h")
    )
    assert failed.session.status == s.SESSION_STATUS_ERROR
    assert failed.session.qr_status == s.QR_STATUS_NONE
    assert failed.session.last_error_code == "TEMPORARY_BAN"
    assert failed.session.last_error_message == "Banned for 24 h"


async def test_send_only_when_connected(harness: Harness) -> None:
    await _create(harness, "idle")
    metadata = await _fails(
        harness.sessions.Send(pb.SendRequest(instance_id="idle", to=PHONE, text="hola")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_NOT_CONNECTED",
    )
    assert metadata == {"instance_id": "idle", "status": "init"}

    await _connected(harness, "live")
    first = await harness.sessions.Send(
        pb.SendRequest(instance_id="live", to=PHONE, text="hola", idempotency_key="order-1")
    )
    assert first.status == pb.MESSAGE_STATUS_SENT
    assert first.whatsapp_message_id
    assert not first.replayed
    again = await harness.sessions.Send(
        pb.SendRequest(instance_id="live", to=PHONE, text="hola", idempotency_key="order-1")
    )
    assert again.replayed
    assert (again.message_id, again.whatsapp_message_id) == (
        first.message_id,
        first.whatsapp_message_id,
    )
    other = await harness.sessions.Send(
        pb.SendRequest(instance_id="live", to=PHONE, text="hola", idempotency_key="order-2")
    )
    assert other.message_id != first.message_id


async def test_send_refused_by_whatsapp_is_recorded_and_replayed(harness: Harness) -> None:
    await _connected(harness, "refused")
    await harness.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="refused", fault=sim.FAULT_SEND)
    )
    request = pb.SendRequest(instance_id="refused", to=PHONE, text="hola", idempotency_key="k")
    first = await _fails(
        harness.sessions.Send(request), grpc.StatusCode.UNAVAILABLE, "WHATSAPP_ERROR"
    )
    replay = await _fails(
        harness.sessions.Send(request), grpc.StatusCode.UNAVAILABLE, "WHATSAPP_ERROR"
    )
    assert replay["message_id"] == first["message_id"]
    assert (first["replayed"], replay["replayed"]) == ("false", "true")


async def test_qr_generation_failure(harness: Harness) -> None:
    await _create(harness, "nocode")
    await harness.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="nocode", fault=sim.FAULT_PAIRING)
    )
    info = await _fails(_qr(harness, "nocode"), grpc.StatusCode.INTERNAL, "QR_GENERATION_FAILED")
    assert info["engine_code"] == "PAIRING_FAILED"
    failed = await _get(harness, "nocode")  # the session shows why, and stays init
    assert (failed.status, failed.qr_status) == (s.SESSION_STATUS_INIT, s.QR_STATUS_NONE)
    assert failed.last_error_code == "PAIRING_FAILED"
    assert "told to fail pairing" in failed.last_error_message
    assert (await _qr(harness, "nocode")).session.qr_status == s.QR_STATUS_GENERATED


@pytest.mark.parametrize(
    ("engine_code", "status", "reason"),
    [
        ("CREDENTIALS_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
        ("CREDENTIALS_FENCED", grpc.StatusCode.UNAVAILABLE, "SESSION_MOVING"),
    ],
)
async def test_pairing_that_cannot_start_is_retryable_and_changes_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, engine_code: str, status: Any, reason: str
) -> None:
    """The credentials database out of reach (or no longer this node's) is no pairing failure."""
    created = await _create(harness, "nodb")
    engine_ = harness.running.manager.engine
    real = engine_.start_pairing

    async def refused(session: Any) -> None:
        raise EngineError(engine_code, "the credentials database failed: starting up")

    monkeypatch.setattr(engine_, "start_pairing", refused)
    info = await _fails(_qr(harness, "nodb"), status, reason)
    if reason == "STORAGE_UNAVAILABLE":
        assert (info["commit"], info["cause"]) == ("none", "unreachable")
    assert await _get(harness, "nodb") == created  # not even the error was recorded
    monkeypatch.setattr(engine_, "start_pairing", real)
    assert (await _qr(harness, "nodb")).session.qr_status == s.QR_STATUS_GENERATED


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SendRequest(instance_id="arg", to="not a phone", text="hola"), "to"),
        (pb.SendRequest(instance_id="arg", to=PHONE, text="   "), "text"),
        (pb.SendRequest(instance_id="arg", to=PHONE, text="x" * 4097), "text"),
        (
            pb.SendRequest(instance_id="arg", to=PHONE, text="hola", idempotency_key=""),
            "idempotency_key",
        ),
    ],
)
async def test_invalid_send_arguments(
    harness: Harness, request_: pb.SendRequest, field: str
) -> None:
    await _connected(harness, "arg")
    metadata = await _fails(
        harness.sessions.Send(request_), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert metadata["field"] == field


async def test_invalid_engine_reports_change_nothing(harness: Harness) -> None:
    await _create(harness, "rep")
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(harness.clock.now() - timedelta(seconds=1))
    for call, field in (
        (
            harness.engine.ReportQRCode(
                engine.ReportQRCodeRequest(instance_id="rep", code="2@x", expires_at=past)
            ),
            "expires_at",
        ),
        (
            harness.engine.ReportQRCode(engine.ReportQRCodeRequest(instance_id="rep", code="2@x")),
            "expires_at",
        ),
        (
            harness.engine.ReportDisconnected(engine.ReportDisconnectedRequest(instance_id="rep")),
            "reason",
        ),
        (
            harness.engine.ReportError(
                engine.ReportErrorRequest(instance_id="rep", code="lower", message="m")
            ),
            "code",
        ),
        (
            harness.engine.ReportConnected(
                engine.ReportConnectedRequest(instance_id="rep", phone_number="12")
            ),
            "phone_number",
        ),
    ):
        metadata = await _fails(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert metadata["field"] == field
    assert (await _get(harness, "rep")).revision == 1


async def test_list_sessions_pages_and_filters(harness: Harness) -> None:
    for n in range(7):
        await _create(harness, f"sender_{n}")
    await _qr(harness, "sender_3")
    pages, token = [], ""
    while True:
        page = await harness.sessions.ListSessions(
            pb.ListSessionsRequest(page_size=3, page_token=token)
        )
        pages.append([x.instance_id for x in page.sessions])
        token = page.next_page_token
        if not token:
            break
    assert pages == [
        ["sender_0", "sender_1", "sender_2"],
        ["sender_3", "sender_4", "sender_5"],
        ["sender_6"],
    ]
    waiting = await harness.sessions.ListSessions(
        pb.ListSessionsRequest(status=s.SESSION_STATUS_QR_REQUIRED)
    )
    assert [x.instance_id for x in waiting.sessions] == ["sender_3"]
    for bad in (pb.ListSessionsRequest(page_token="%%%"), pb.ListSessionsRequest(page_size=1001)):
        await _fails(
            harness.sessions.ListSessions(bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        )


async def test_delete_session(harness: Harness) -> None:
    await _connected(harness, "bye")
    await harness.sessions.Send(
        pb.SendRequest(instance_id="bye", to=PHONE, text="x", idempotency_key="k")
    )
    await harness.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="bye"))
    await _fails(_get(harness, "bye"), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    again = await _create(harness, "bye")  # the id can be used again, from scratch
    assert again.revision == 1
    assert again.status == s.SESSION_STATUS_INIT


async def test_pair_phone_returns_a_linking_code_and_keeps_the_qr(harness: Harness) -> None:
    await _create(harness, "code")
    request = pb.PairPhoneRequest(instance_id="code", phone_number="+54 9 11 2233-4455")
    first = await harness.sessions.PairPhone(request)
    assert len(first.linking_code) == 8
    assert set(first.linking_code) <= set("123456789ABCDEFGHJKLMNPQRSTVWXYZ")
    assert (first.session.status, first.session.qr_status) == (
        s.SESSION_STATUS_QR_REQUIRED,
        s.QR_STATUS_GENERATED,
    )
    shown = await _qr(harness, "code")  # the QR code of the same pairing still works
    assert shown.qr_string == first.session.qr_string
    linked = await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="code"))
    assert linked.session.phone_number == "+5491122334455"  # the phone that asked
    await _fails(
        harness.sessions.PairPhone(request),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_ALREADY_CONNECTED",
    )


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (pb.PairPhoneRequest(instance_id="code", phone_number="12"), "INVALID_ARGUMENT"),
        (
            pb.PairPhoneRequest(instance_id="bad id", phone_number="+5491122334455"),
            "INVALID_INSTANCE_ID",
        ),
        (
            pb.PairPhoneRequest(instance_id="missing", phone_number="+5491122334455"),
            "SESSION_NOT_FOUND",
        ),
    ],
)
async def test_pair_phone_rejects_bad_input_and_changes_nothing(
    harness: Harness, request_: pb.PairPhoneRequest, reason: str
) -> None:
    await _create(harness, "code")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await harness.sessions.PairPhone(request_)
    assert error_info(failure.value).reason == reason
    assert (await _get(harness, "code")).revision == 1
