"""Central Hub's reaction table, as code.

Central Hub never infers a state: it reads ``status`` and reacts by this table.

| status       | action                 |
|--------------|------------------------|
| init         | REQUEST_QR             |
| qr_required  | SHOW_QR                |
| connecting   | WAIT                   |
| connected    | SEND                   |
| disconnected | BLOCK_OFFER_RECONNECT  |
| error        | BLOCK_ALERT (shows ``last_error_message``) |

``ensure_can_send`` is the pre-send check of seed 000: it raises
``SessionNotReadyError`` with the seed's Spanish message (and an English one)
unless the session is connected.
"""

from __future__ import annotations

from enum import StrEnum

from sessionmanager.v1 import session_pb2
from sessionmanager_client.enums import SessionStatus, status_of


class Action(StrEnum):
    REQUEST_QR = "request_qr"
    SHOW_QR = "show_qr"
    WAIT = "wait"
    SEND = "send"
    BLOCK_OFFER_RECONNECT = "block_offer_reconnect"
    BLOCK_ALERT = "block_alert"


REACTIONS: dict[SessionStatus, Action] = {
    SessionStatus.INIT: Action.REQUEST_QR,
    SessionStatus.QR_REQUIRED: Action.SHOW_QR,
    SessionStatus.CONNECTING: Action.WAIT,
    SessionStatus.CONNECTED: Action.SEND,
    SessionStatus.DISCONNECTED: Action.BLOCK_OFFER_RECONNECT,
    SessionStatus.ERROR: Action.BLOCK_ALERT,
}

# Pre-send rejection messages: (Spanish, from seed 000; English). ``error`` uses
# the session's own ``last_error_message``.
_NOT_READY: dict[SessionStatus, tuple[str, str]] = {
    SessionStatus.INIT: ("Escanea el código QR para conectar", "Scan the QR code to connect"),
    SessionStatus.QR_REQUIRED: ("Debes escanear el código QR", "You must scan the QR code"),
    SessionStatus.CONNECTING: (
        "Esperando conexión, intenta de nuevo",
        "Waiting for the connection, try again",
    ),
    SessionStatus.DISCONNECTED: (
        "WhatsApp desconectado, reconecta",
        "WhatsApp is disconnected, reconnect",
    ),
}


def reaction(session: session_pb2.WhatsAppSession) -> Action:
    """What Central Hub may do with the session, by its ``status`` alone."""
    return REACTIONS[status_of(session)]


class SessionNotReadyError(Exception):
    """The session cannot send: ``message`` is Spanish (seed 000), ``message_en`` English."""

    def __init__(self, session: session_pb2.WhatsAppSession) -> None:
        self.session = session
        self.instance_id = session.instance_id
        self.status = status_of(session)
        self.action = reaction(session)
        if self.status is SessionStatus.ERROR:
            detail = session.last_error_message or session.last_error_code or "error"
            self.message = self.message_en = detail
        else:
            self.message, self.message_en = _NOT_READY[self.status]
        super().__init__(self.message)


def ensure_can_send(session: session_pb2.WhatsAppSession) -> None:
    """Raise ``SessionNotReadyError`` unless the session is ``connected``."""
    if status_of(session) is not SessionStatus.CONNECTED:
        raise SessionNotReadyError(session)
