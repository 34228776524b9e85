"""The domain's resources as the contract's protobuf messages: a session, a message, an event.

Each is built once per value (the values are immutable and hashable) and
shared by every reply and every stream that sends it: never modify the result.
"""

from __future__ import annotations

import functools
from datetime import datetime

from google.protobuf import timestamp_pb2

from service.domain.contract import event_type_from_text
from service.domain.events import Event, event_message, event_session
from service.domain.states import Session
from service.store.messages import Message
from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import session_service_pb2 as pb


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


@functools.lru_cache(maxsize=4096)
def session_message(s: Session) -> session_pb2.WhatsAppSession:
    """The contract's ``WhatsAppSession`` for a committed session state."""
    message = session_pb2.WhatsAppSession(
        id=s.id,
        instance_id=s.instance_id,
        status=s.status,
        qr_status=s.qr_status,
        created_at=timestamp(s.created_at),
        updated_at=timestamp(s.updated_at),
        revision=s.revision,
    )
    for name in ("phone_number", "qr_string", "last_error_code", "last_error_message"):
        value = getattr(s, name)
        if value is not None:
            setattr(message, name, value)
    for name in ("qr_generated_at", "qr_expires_at", "connected_at", "disconnected_at"):
        value = getattr(s, name)
        if value is not None:
            getattr(message, name).FromDatetime(value)
    return message


def message_proto(m: Message) -> pb.Message:
    """The contract's ``Message`` for a message as it stands."""
    message = pb.Message(
        message_id=m.id,
        instance_id=m.instance_id,
        session_id=m.session_id,
        to=m.recipient,
        status=m.status,
        accepted_at=timestamp(m.accepted_at),
        updated_at=timestamp(m.updated_at or m.accepted_at),
    )
    for name in ("idempotency_key", "whatsapp_message_id", "error_code", "error_message"):
        value = getattr(m, name)
        if value is not None:
            setattr(message, name, value)
    for name in ("delivered_at", "read_at"):
        value = getattr(m, name)
        if value is not None:
            getattr(message, name).FromDatetime(value)
    return message


@functools.lru_cache(maxsize=4096)
def event_proto(e: Event) -> pb.Event:
    """The contract's ``Event``, with its resource decoded from the log's JSON."""
    event = pb.Event(
        sequence=e.sequence,
        id=e.id,
        type=event_type_from_text(e.type),
        occurred_at=timestamp(e.occurred_at),
    )
    if e.about_session:
        event.session.CopyFrom(session_message(event_session(e)))
    else:
        event.message.CopyFrom(message_proto(event_message(e)))
    return event
