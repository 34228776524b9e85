"""The frozen enums as Python ``str`` enums whose values are the text forms.

The text form of a value is its protobuf name without the enum's prefix,
lower-cased (``SESSION_STATUS_QR_REQUIRED`` -> ``qr_required``). The members
are built at import time from the generated descriptors: there is no
hand-written table of values anywhere in the client.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sessionmanager.v1 import session_pb2


def _members(enum: Any, prefix: str) -> list[tuple[str, str]]:
    """``[(member name, text form), ...]`` in descriptor order."""
    return [
        (name.removeprefix(prefix), name.removeprefix(prefix).lower())
        for name, _number in enum.items()
    ]


if TYPE_CHECKING:
    # What type checkers see; at run time the members come from the descriptors.
    from enum import auto

    class SessionStatus(StrEnum):
        INIT = auto()
        QR_REQUIRED = auto()
        CONNECTING = auto()
        CONNECTED = auto()
        DISCONNECTED = auto()
        ERROR = auto()

    class QRStatus(StrEnum):
        NONE = auto()
        GENERATED = auto()
        EXPIRED = auto()
        USED = auto()

else:
    SessionStatus = StrEnum(
        "SessionStatus", _members(session_pb2.SessionStatus, "SESSION_STATUS_"), module=__name__
    )
    QRStatus = StrEnum("QRStatus", _members(session_pb2.QRStatus, "QR_STATUS_"), module=__name__)

_STATUS_BY_NUMBER: dict[int, SessionStatus] = {
    number: SessionStatus[name.removeprefix("SESSION_STATUS_")]
    for name, number in session_pb2.SessionStatus.items()
}
_QR_BY_NUMBER: dict[int, QRStatus] = {
    number: QRStatus[name.removeprefix("QR_STATUS_")]
    for name, number in session_pb2.QRStatus.items()
}
_NUMBER_BY_STATUS = {status: number for number, status in _STATUS_BY_NUMBER.items()}


def session_status(number: int) -> SessionStatus:
    """``session_pb2.SESSION_STATUS_QR_REQUIRED`` -> ``SessionStatus.QR_REQUIRED``."""
    return _STATUS_BY_NUMBER[number]


def qr_status(number: int) -> QRStatus:
    """``session_pb2.QR_STATUS_GENERATED`` -> ``QRStatus.GENERATED``."""
    return _QR_BY_NUMBER[number]


def status_number(status: SessionStatus | str) -> session_pb2.SessionStatus.ValueType:
    """``"qr_required"`` -> ``session_pb2.SESSION_STATUS_QR_REQUIRED`` (for request filters)."""
    return _NUMBER_BY_STATUS[SessionStatus(status)]  # type: ignore[return-value]


def status_of(session: session_pb2.WhatsAppSession) -> SessionStatus:
    """The session's ``status`` as its text form."""
    return session_status(session.status)


def qr_status_of(session: session_pb2.WhatsAppSession) -> QRStatus:
    """The session's ``qr_status`` as its text form."""
    return qr_status(session.qr_status)
