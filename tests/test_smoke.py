"""The happy path through the public API on the simulated engine."""

from __future__ import annotations

from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness


async def test_create_pair_send_disconnect(harness: Harness) -> None:
    created = await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_51"))
    assert created.session.status == session_pb2.SESSION_STATUS_INIT
    assert created.session.qr_status == session_pb2.QR_STATUS_NONE
    assert created.session.revision == 1

    qr = await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_51"))
    assert qr.qr_string.startswith("data:image/png;base64,")
    assert qr.session.status == session_pb2.SESSION_STATUS_QR_REQUIRED
    assert qr.session.qr_status == session_pb2.QR_STATUS_GENERATED
    expiry = qr.qr_expires_at.ToDatetime() - qr.session.qr_generated_at.ToDatetime()
    assert expiry.total_seconds() == 60

    scanned = await harness.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="sender_51", phone_number="+5491122334455")
    )
    assert scanned.session.status == session_pb2.SESSION_STATUS_CONNECTED
    assert scanned.session.phone_number == "+5491122334455"
    assert not scanned.session.HasField("qr_string")

    sent = await harness.sessions.Send(
        pb.SendRequest(instance_id="sender_51", to="+5491100000000", text="hola")
    )
    assert sent.status == pb.MESSAGE_STATUS_SENT

    gone = await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_51"))
    assert gone.session.status == session_pb2.SESSION_STATUS_DISCONNECTED
    assert gone.session.last_error_code == "LOGOUT"
