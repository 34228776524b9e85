"""The worker protocol: its framing and the one codec between engine reports
and the frames that carry them.

Frames are a 4-byte big-endian length, then the message: ``WorkerCommand``
(server to worker, on the worker's standard input) and ``WorkerEvent``
(worker to server, on its standard output), defined in
``protos/sessionmanager/v1/worker.proto``. A report is a ``states`` event on
both sides of the pipe (a receipt for sent messages is a ``MessageReceipt``);
only this module spells out how each one travels.
"""

from __future__ import annotations

import asyncio
import struct
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from service.domain import states
from service.domain.receipts import RECEIPT_STATUSES, MessageReceipt
from service.engine.port import EngineError
from sessionmanager.v1 import worker_pb2

Command = worker_pb2.WorkerCommand
Event = worker_pb2.WorkerEvent
Reply = worker_pb2.WorkerEvent.Reply

MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">I")

#: A worker that reported what happened and needs no restart exits with 0.
EXIT_DONE = 0
#: A worker that reported a transient failure (WhatsApp unreachable) exits with
#: this (EX_TEMPFAIL): the server starts it again after a backoff. Any other
#: exit is a crash.
EXIT_RETRY = 75
#: A worker whose Hold deadline passed exits with this (EX_NOPERM), at once and
#: without a graceful close: its node may no longer own the session. It is
#: neither restarted nor reported.
EXIT_LEASE_EXPIRED = 77


class ProtocolError(Exception):
    """The other end wrote something that is not a frame of the protocol."""


def encode(message: Message) -> bytes:
    body = message.SerializeToString()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body, or ``None`` at a clean end of the stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ProtocolError("the stream ended inside a frame header") from error
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise ProtocolError("the stream ended inside a frame") from error


def report_frame(event: states.EngineEvent, now: datetime) -> Event:
    """The frame that carries ``event``; a code's expiry travels as its lifetime."""
    match event:
        case states.QRShown(code, expires_at):
            valid_for = Duration()
            valid_for.FromTimedelta(expires_at - now)
            return Event(qr_code=Event.QRCode(code=code, valid_for=valid_for))
        case states.QRScanned():
            return Event(qr_scanned=Event.QRScanned())
        case states.Reconnecting():
            return Event(reconnecting=Event.Reconnecting())
        case states.Connected(phone_number):
            return Event(connected=Event.Connected(phone_number=phone_number))
        case states.Disconnected(reason, message, code):
            return Event(
                disconnected=Event.Disconnected(reason=reason, code=code or "", message=message)
            )
        case states.Failed(code, message):
            return Event(failed=Event.Failed(code=code, message=message))
        case states.PairingFailed(code, message):
            return Event(pairing_failed=Event.PairingFailed(code=code, message=message))
        case MessageReceipt(ids, status, at, code, message):
            stamp = Timestamp()
            stamp.FromDatetime(at)
            receipt = Event.Receipt(
                message_ids=ids, status=status, at=stamp, code=code or "", message=message or ""
            )
            return Event(receipt=receipt)
    raise AssertionError(f"unknown report {event!r}")


def report_of(frame: Event, now: datetime) -> states.EngineEvent:
    """The report a frame carries (not a reply); its lifetime counts from ``now``."""
    match frame.WhichOneof("event"):
        case "qr_code":
            return states.QRShown(frame.qr_code.code, now + frame.qr_code.valid_for.ToTimedelta())
        case "qr_scanned":
            return states.QRScanned()
        case "reconnecting":
            return states.Reconnecting()
        case "connected":
            return states.Connected(frame.connected.phone_number)
        case "disconnected":
            d = frame.disconnected
            return states.Disconnected(d.reason, d.message, d.code or None)
        case "failed":
            return states.Failed(frame.failed.code, frame.failed.message)
        case "pairing_failed":
            return states.PairingFailed(frame.pairing_failed.code, frame.pairing_failed.message)
        case "receipt":
            return _receipt(frame.receipt)
    raise ProtocolError(f"not a report: {frame.WhichOneof('event')}")


def failure_reply(command_id: int, error: EngineError) -> Reply:
    return Reply(
        id=command_id,
        error_code=error.code,
        error_message=error.message,
        outcome_unknown=not error.definite,
    )


def check_reply(reply: Reply) -> Reply:
    """The reply, or the EngineError it carries."""
    if reply.error_code:
        raise EngineError(reply.error_code, reply.error_message, definite=not reply.outcome_unknown)
    return reply


def _receipt(frame: Event.Receipt) -> MessageReceipt:
    if frame.status not in RECEIPT_STATUSES:
        raise ProtocolError(f"a receipt reports delivered, read or failed, not {frame.status}")
    return MessageReceipt(
        tuple(frame.message_ids),
        frame.status,
        frame.at.ToDatetime(tzinfo=UTC),
        frame.code or None,
        frame.message or None,
    )
