"""The frozen enums of the contract and their text form.

The text form of a value (in SQLite, JSON, logs, the command line) is its name
without the enum's prefix, lower-cased: ``SESSION_STATUS_QR_REQUIRED`` is
``qr_required``. One mechanical rule, derived from the generated descriptors.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from sessionmanager.v1 import session_pb2, session_service_pb2

Status: TypeAlias = session_pb2.SessionStatus.ValueType
QRStatus: TypeAlias = session_pb2.QRStatus.ValueType
DisconnectReason: TypeAlias = session_pb2.DisconnectReason.ValueType
Reason: TypeAlias = session_pb2.ErrorReason.ValueType
MessageStatus: TypeAlias = session_service_pb2.MessageStatus.ValueType

INIT: Status = session_pb2.SESSION_STATUS_INIT
QR_REQUIRED: Status = session_pb2.SESSION_STATUS_QR_REQUIRED
CONNECTING: Status = session_pb2.SESSION_STATUS_CONNECTING
CONNECTED: Status = session_pb2.SESSION_STATUS_CONNECTED
DISCONNECTED: Status = session_pb2.SESSION_STATUS_DISCONNECTED
ERROR: Status = session_pb2.SESSION_STATUS_ERROR

QR_NONE: QRStatus = session_pb2.QR_STATUS_NONE
QR_GENERATED: QRStatus = session_pb2.QR_STATUS_GENERATED
QR_EXPIRED: QRStatus = session_pb2.QR_STATUS_EXPIRED
QR_USED: QRStatus = session_pb2.QR_STATUS_USED

LOGOUT: DisconnectReason = session_pb2.DISCONNECT_REASON_LOGOUT
NETWORK: DisconnectReason = session_pb2.DISCONNECT_REASON_NETWORK
TIMEOUT: DisconnectReason = session_pb2.DISCONNECT_REASON_TIMEOUT
UNKNOWN: DisconnectReason = session_pb2.DISCONNECT_REASON_UNKNOWN

PENDING: MessageStatus = session_service_pb2.MESSAGE_STATUS_PENDING
SENT: MessageStatus = session_service_pb2.MESSAGE_STATUS_SENT
FAILED: MessageStatus = session_service_pb2.MESSAGE_STATUS_FAILED
UNKNOWN_MESSAGE: MessageStatus = session_service_pb2.MESSAGE_STATUS_UNKNOWN


#: ``instance_id``: 1 to ``INSTANCE_ID_MAX`` characters, the first of ``INSTANCE_ID_FIRST``,
#: the others of ``INSTANCE_ID_REST`` (character classes); anything else is INVALID_INSTANCE_ID.
INSTANCE_ID_MAX = 64
INSTANCE_ID_FIRST = "A-Za-z0-9"
INSTANCE_ID_REST = "A-Za-z0-9_.-"
#: The rule as a regular expression (Python, PostgreSQL, JSON Schema, the console).
INSTANCE_ID_PATTERN = f"[{INSTANCE_ID_FIRST}][{INSTANCE_ID_REST}]{{0,{INSTANCE_ID_MAX - 1}}}"


def _text_forms(enum: Any, prefix: str, lower: bool) -> dict[int, str]:
    forms = {}
    for name, number in enum.items():
        text = name.removeprefix(prefix)
        forms[number] = text.lower() if lower else text
    return forms


_STATUS_TEXT = _text_forms(session_pb2.SessionStatus, "SESSION_STATUS_", lower=True)
_QR_TEXT = _text_forms(session_pb2.QRStatus, "QR_STATUS_", lower=True)
_REASON_CODE = _text_forms(session_pb2.ErrorReason, "ERROR_REASON_", lower=False)
_DISCONNECT_CODE = _text_forms(session_pb2.DisconnectReason, "DISCONNECT_REASON_", lower=False)
_MESSAGE_TEXT = _text_forms(session_service_pb2.MessageStatus, "MESSAGE_STATUS_", lower=True)

STATUS_TEXTS: tuple[str, ...] = tuple(_STATUS_TEXT.values())
QR_STATUS_TEXTS: tuple[str, ...] = tuple(_QR_TEXT.values())
MESSAGE_STATUS_TEXTS: tuple[str, ...] = tuple(
    text for number, text in _MESSAGE_TEXT.items() if number != 0
)
_STATUS_BY_TEXT = {text: number for number, text in _STATUS_TEXT.items()}
_QR_BY_TEXT = {text: number for number, text in _QR_TEXT.items()}
_MESSAGE_BY_TEXT = {text: number for number, text in _MESSAGE_TEXT.items()}


def status_text(status: Status) -> str:
    """``SESSION_STATUS_QR_REQUIRED`` -> ``qr_required``."""
    return _STATUS_TEXT[status]


def qr_status_text(qr_status: QRStatus) -> str:
    """``QR_STATUS_GENERATED`` -> ``generated``."""
    return _QR_TEXT[qr_status]


def status_from_text(text: str) -> Status:
    return _STATUS_BY_TEXT[text]  # type: ignore[return-value]


def qr_status_from_text(text: str) -> QRStatus:
    return _QR_BY_TEXT[text]  # type: ignore[return-value]


def message_status_text(status: MessageStatus) -> str:
    return _MESSAGE_TEXT[status]


def message_status_from_text(text: str) -> MessageStatus:
    return _MESSAGE_BY_TEXT[text]  # type: ignore[return-value]


def reason_code(reason: Reason) -> str:
    """``ERROR_REASON_SESSION_NOT_FOUND`` -> ``SESSION_NOT_FOUND`` (the ErrorInfo reason)."""
    return _REASON_CODE[reason]


def disconnect_code(reason: DisconnectReason) -> str:
    """``DISCONNECT_REASON_LOGOUT`` -> ``LOGOUT`` (stored in ``last_error_code``)."""
    return _DISCONNECT_CODE[reason]
