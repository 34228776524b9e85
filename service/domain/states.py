"""The session state machine: every transition of the lifecycle and every invariant.

A transition is a pure function from the current session, an event and the
time to the next session (revision + 1), or ``None`` when the event changes
nothing. An event the current state does not allow raises the contract error
and changes nothing. No other module changes a session.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from service.domain import errors
from service.domain.contract import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    ERROR,
    INIT,
    LOGOUT,
    QR_EXPIRED,
    QR_GENERATED,
    QR_NONE,
    QR_REQUIRED,
    QR_USED,
    DisconnectReason,
    QRStatus,
    Status,
    disconnect_code,
    qr_status_text,
    status_text,
)
from service.domain.qr import render_data_url
from service.domain.receipts import MessageReceipt
from sessionmanager.v1 import session_pb2


@dataclass(frozen=True, slots=True)
class SessionRef:
    """One incarnation of a session: its ``instance_id`` and the ``id`` of its row.

    After DeleteSession and CreateSession with the same ``instance_id`` the new
    incarnation has a new ``id``; nothing addressed to the old one touches it.
    """

    instance_id: str
    id: int

    def __str__(self) -> str:
        return f"{self.instance_id}#{self.id}"


@dataclass(frozen=True, slots=True)
class Session:
    """One committed state of a session: the contract's entity plus ``revision``."""

    id: int
    instance_id: str
    status: Status
    qr_status: QRStatus
    created_at: datetime
    updated_at: datetime
    revision: int
    phone_number: str | None = None
    qr_string: str | None = None
    qr_generated_at: datetime | None = None
    qr_expires_at: datetime | None = None
    connected_at: datetime | None = None
    disconnected_at: datetime | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None

    @property
    def ref(self) -> SessionRef:
        return SessionRef(self.instance_id, self.id)

    def has_valid_qr(self, now: datetime) -> bool:
        return (
            self.status == QR_REQUIRED
            and self.qr_status == QR_GENERATED
            and self.qr_expires_at is not None
            and now < self.qr_expires_at
        )


# Events: what can happen to a session.


@dataclass(frozen=True, slots=True)
class QRShown:
    """The engine shows a (new or rotated) pairing code: its payload, drawn as a QR image."""

    code: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class QRExpired:
    """The clock passed ``expires_at`` of the code that carried it."""

    expires_at: datetime


@dataclass(frozen=True, slots=True)
class QRScanned:
    """The phone scanned the valid code."""


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """A paired device is reconnecting (after a drop, or after a restart)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake finished, or a paired device reconnected."""

    phone_number: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended for ``reason``; LOGOUT unlinks the device.

    ``code`` tells apart causes that share a reason (``STREAM_REPLACED``,
    ``WORKER_CRASHED``); by default it is the reason's name.
    """

    reason: DisconnectReason
    message: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """An unrecoverable fault: ban, outdated client, broken store."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PairingFailed:
    """Pairing could not start or go on (WhatsApp unreachable, the worker died).

    The status stays; the cause is recorded in ``last_error_*``; a shown code
    can no longer be scanned, so it becomes expired.
    """

    code: str
    message: str


#: What an engine reports about a session's connection: every session event but the clock's.
SessionEvent = (
    QRShown | QRScanned | Reconnecting | Connected | Disconnected | Failed | PairingFailed
)
#: Everything an engine reports: a session event, or WhatsApp's receipt for messages it sent.
EngineEvent = SessionEvent | MessageReceipt
#: What changes a session: the engine's session events and the clock's.
Event = SessionEvent | QRExpired

_ANY_STATUS = frozenset({INIT, QR_REQUIRED, CONNECTING, CONNECTED, DISCONNECTED, ERROR})
_QR_FROM = frozenset({INIT, QR_REQUIRED, DISCONNECTED, ERROR})
_CONNECTED_FROM = frozenset({QR_REQUIRED, CONNECTING, DISCONNECTED})
_RECONNECTING_FROM = frozenset({CONNECTED, DISCONNECTED})

LOGOUT_CODE = disconnect_code(LOGOUT)

DISCONNECT_MESSAGES: dict[DisconnectReason, str] = {
    session_pb2.DISCONNECT_REASON_LOGOUT: "The device was unlinked; scan a new QR code to connect",
    session_pb2.DISCONNECT_REASON_NETWORK: "The network connection to WhatsApp dropped",
    session_pb2.DISCONNECT_REASON_TIMEOUT: "The connection to WhatsApp timed out",
    session_pb2.DISCONNECT_REASON_UNKNOWN: "The connection to WhatsApp ended",
}


def new_session(instance_id: str, now: datetime) -> Session:
    """The state of a created session: init / none, revision 1 (id set by the store)."""
    return Session(
        id=0,
        instance_id=instance_id,
        status=INIT,
        qr_status=QR_NONE,
        created_at=now,
        updated_at=now,
        revision=1,
    )


def _not_allowed(session: Session, event: Event) -> errors.ContractError:
    return errors.in_status(
        session_pb2.ERROR_REASON_INVALID_TRANSITION,
        f"{type(event).__name__} is not allowed while session {session.instance_id!r} is "
        f"{status_text(session.status)} / {qr_status_text(session.qr_status)}",
        session.instance_id,
        session.status,
    )


def _without_qr(session: Session, qr_status: QRStatus) -> dict[str, object]:
    keep_times = qr_status == QR_USED
    return {
        "qr_status": qr_status,
        "qr_string": None,
        "qr_generated_at": session.qr_generated_at if keep_times else None,
        "qr_expires_at": session.qr_expires_at if keep_times else None,
    }


def _changes(session: Session, event: Event, now: datetime) -> dict[str, object] | None:
    """The fields the event changes, ``None`` for no change; raises if not allowed."""
    match event:
        case QRShown(code, expires_at):
            if expires_at <= now:
                raise errors.invalid_argument(
                    "expires_at", "expires_at must be in the future", session.instance_id
                )
            if session.status not in _QR_FROM:
                raise _not_allowed(session, event)
            return {
                "status": QR_REQUIRED,
                "qr_status": QR_GENERATED,
                "qr_string": render_data_url(code),
                "qr_generated_at": now,
                "qr_expires_at": expires_at,
            }
        case QRExpired(expires_at):
            if session.qr_status != QR_GENERATED or session.qr_expires_at != expires_at:
                return None  # that code was already replaced, scanned or dropped
            return {"qr_status": QR_EXPIRED}
        case QRScanned():
            if not session.has_valid_qr(now):
                raise errors.in_status(
                    session_pb2.ERROR_REASON_QR_NOT_AVAILABLE,
                    f"session {session.instance_id!r} shows no valid QR code to scan",
                    session.instance_id,
                    session.status,
                )
            return {"status": CONNECTING, **_without_qr(session, QR_USED)}
        case Reconnecting():
            if session.status == CONNECTING:
                return None
            if session.status not in _RECONNECTING_FROM:
                raise _not_allowed(session, event)
            return {"status": CONNECTING, **_without_qr(session, QR_NONE)}
        case Connected(phone_number):
            if session.status == CONNECTED and session.phone_number == phone_number:
                return None
            if session.status not in _CONNECTED_FROM:
                raise _not_allowed(session, event)
            return {
                "status": CONNECTED,
                "phone_number": phone_number,
                "connected_at": now,
                "last_error_code": None,
                "last_error_message": None,
                **_without_qr(session, QR_NONE),
            }
        case Disconnected(reason, message, given_code):
            code = given_code or disconnect_code(reason)
            if session.status == INIT:
                raise errors.in_status(
                    session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED,
                    f"session {session.instance_id!r} was never connected",
                    session.instance_id,
                    session.status,
                )
            if session.status == DISCONNECTED and session.last_error_code in (code, LOGOUT_CODE):
                return None  # already so, or unlinked: no connection is left to drop
            return {
                "status": DISCONNECTED,
                "disconnected_at": now,
                "last_error_code": code,
                "last_error_message": message or DISCONNECT_MESSAGES[reason],
                **_without_qr(session, QR_NONE),
            }
        case Failed(code, message):
            if (
                session.status == ERROR
                and session.last_error_code == code
                and session.last_error_message == message
            ):
                return None
            return {
                "status": ERROR,
                "last_error_code": code,
                "last_error_message": message,
                **_without_qr(session, QR_NONE),
            }
        case PairingFailed(code, message):
            if session.status in (CONNECTING, CONNECTED):
                raise _not_allowed(session, event)
            changes: dict[str, object] = {"last_error_code": code, "last_error_message": message}
            if session.qr_status == QR_GENERATED:
                changes["qr_status"] = QR_EXPIRED
            elif (session.last_error_code, session.last_error_message) == (code, message):
                return None
            return changes
    raise AssertionError(f"unknown event {event!r}")


def apply(session: Session, event: Event, now: datetime) -> Session | None:
    """The session after ``event`` at ``now``, or ``None`` when nothing changes.

    Raises the contract error when the current state does not allow the event.
    """
    changes = _changes(session, event, now)
    if changes is None:
        return None
    updated = dataclasses.replace(
        session,
        **changes,  # type: ignore[arg-type]
        updated_at=max(now, session.updated_at),
        revision=session.revision + 1,
    )
    check_invariants(updated)
    return updated


# Preconditions of the public operations.


def check_qr_request(session: Session, now: datetime) -> bool:
    """Whether RequestQR can return the current code as it is (True) or needs a new one.

    Raises SESSION_ALREADY_CONNECTED on a connected session and QR_NOT_AVAILABLE
    on a connecting one.
    """
    if session.status == CONNECTED:
        raise errors.in_status(
            session_pb2.ERROR_REASON_SESSION_ALREADY_CONNECTED,
            f"session {session.instance_id!r} is already connected",
            session.instance_id,
            session.status,
        )
    if session.status == CONNECTING:
        raise errors.in_status(
            session_pb2.ERROR_REASON_QR_NOT_AVAILABLE,
            f"session {session.instance_id!r} is connecting; no QR code is needed",
            session.instance_id,
            session.status,
        )
    return session.has_valid_qr(now)


def check_can_send(session: Session) -> None:
    if session.status != CONNECTED:
        raise errors.in_status(
            session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED,
            f"session {session.instance_id!r} is {status_text(session.status)}, not connected",
            session.instance_id,
            session.status,
        )


def is_logged_out(session: Session) -> bool:
    return session.status == DISCONNECTED and session.last_error_code == LOGOUT_CODE


# Invariants.


class InvariantViolation(AssertionError):
    """A session state the contract forbids; never committed."""


def check_invariants(session: Session) -> None:
    problems = []
    if session.status not in _ANY_STATUS:
        problems.append(f"unknown status {session.status}")
    if session.qr_string is not None and session.qr_status not in (QR_GENERATED, QR_EXPIRED):
        problems.append("qr_string is set while qr_status is not generated or expired")
    if session.qr_status in (QR_GENERATED, QR_EXPIRED):
        if session.qr_string is None or session.qr_expires_at is None:
            problems.append("a generated or expired QR has no qr_string or qr_expires_at")
        elif not session.qr_string.startswith("data:image/png;base64,"):
            problems.append("qr_string is not a PNG data URL")
        if session.status != QR_REQUIRED:
            problems.append("a generated or expired QR outside qr_required")
    if session.qr_status == QR_NONE and (session.qr_generated_at or session.qr_expires_at):
        problems.append("QR times are set while qr_status is none")
    if session.qr_status == QR_USED and session.status != CONNECTING:
        problems.append("a used QR outside connecting")
    if session.status == QR_REQUIRED and session.qr_status not in (QR_GENERATED, QR_EXPIRED):
        problems.append("qr_required without a generated or expired QR")
    if session.status == CONNECTED and (
        session.phone_number is None or session.connected_at is None
    ):
        problems.append("connected without phone_number or connected_at")
    if session.status == ERROR and (
        session.last_error_code is None or session.last_error_message is None
    ):
        problems.append("error without last_error_code or last_error_message")
    if session.revision < 1:
        problems.append("revision below 1")
    if session.updated_at < session.created_at:
        problems.append("updated_at before created_at")
    if problems:
        raise InvariantViolation(f"session {session.instance_id!r}: " + "; ".join(problems))
