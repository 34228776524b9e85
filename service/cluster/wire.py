"""The public messages a forwarded command carries back, as the domain's values."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from service.domain.sending import SendResult
from service.domain.states import Session
from service.store.messages import Message
from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import session_service_pb2 as pb


def _time(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def session_from_message(m: session_pb2.WhatsAppSession) -> Session:
    """The inverse of ``service.api.resources.session_message``."""

    def optional_time(name: str) -> datetime | None:
        return _time(getattr(m, name)) if m.HasField(name) else None  # type: ignore[arg-type]

    def optional_text(name: str) -> str | None:
        return str(getattr(m, name)) if m.HasField(name) else None  # type: ignore[arg-type]

    return Session(
        id=m.id,
        instance_id=m.instance_id,
        status=m.status,
        qr_status=m.qr_status,
        created_at=_time(m.created_at),
        updated_at=_time(m.updated_at),
        revision=m.revision,
        phone_number=optional_text("phone_number"),
        qr_string=optional_text("qr_string"),
        qr_generated_at=optional_time("qr_generated_at"),
        qr_expires_at=optional_time("qr_expires_at"),
        connected_at=optional_time("connected_at"),
        disconnected_at=optional_time("disconnected_at"),
        last_error_code=optional_text("last_error_code"),
        last_error_message=optional_text("last_error_message"),
    )


def send_result_from_response(
    response: pb.SendResponse, request: pb.SendRequest, session_id: int
) -> SendResult:
    message = Message(
        id=response.message_id,
        session_id=session_id,
        instance_id=request.instance_id,
        idempotency_key=request.idempotency_key if request.HasField("idempotency_key") else None,
        recipient=request.to,
        text=request.text,
        status=response.status,
        accepted_at=_time(response.accepted_at),
        whatsapp_message_id=(
            response.whatsapp_message_id if response.HasField("whatsapp_message_id") else None
        ),
    )
    return SendResult(message, replayed=response.replayed)
