"""The reaction table and the pre-send messages, for all six statuses."""

from __future__ import annotations

import pytest

from sessionmanager.v1 import session_pb2
from sessionmanager_client.enums import (
    QRStatus,
    SessionStatus,
    qr_status_of,
    status_number,
    status_of,
)
from sessionmanager_client.reaction import Action, SessionNotReadyError, ensure_can_send, reaction

EXPECTED = {
    "init": (Action.REQUEST_QR, "Escanea el código QR para conectar"),
    "qr_required": (Action.SHOW_QR, "Debes escanear el código QR"),
    "connecting": (Action.WAIT, "Esperando conexión, intenta de nuevo"),
    "connected": (Action.SEND, None),
    "disconnected": (Action.BLOCK_OFFER_RECONNECT, "WhatsApp desconectado, reconecta"),
    "error": (Action.BLOCK_ALERT, "WhatsApp banned this number temporarily"),
}


def session(status: str) -> session_pb2.WhatsAppSession:
    message = session_pb2.WhatsAppSession(
        instance_id="sender_51", status=status_number(status), revision=3
    )
    if status == "connected":
        message.phone_number = "+5491122334455"
    if status == "error":
        message.last_error_code = "TEMPORARY_BAN"
        message.last_error_message = "WhatsApp banned this number temporarily"
    return message


def test_enums_are_the_frozen_text_forms() -> None:
    assert [s.value for s in SessionStatus] == list(EXPECTED)
    assert [q.value for q in QRStatus] == ["none", "generated", "expired", "used"]
    assert str(SessionStatus.QR_REQUIRED) == "qr_required"
    assert SessionStatus("qr_required") is SessionStatus.QR_REQUIRED
    for name, number in session_pb2.SessionStatus.items():
        message = session_pb2.WhatsAppSession(status=number)
        assert status_of(message).value == name.removeprefix("SESSION_STATUS_").lower()
    for qr_name, qr_number in session_pb2.QRStatus.items():
        message = session_pb2.WhatsAppSession(qr_status=qr_number)
        assert qr_status_of(message).value == qr_name.removeprefix("QR_STATUS_").lower()


def test_table_covers_every_status() -> None:
    assert {s.value for s in SessionStatus} == set(EXPECTED)


@pytest.mark.parametrize("status", list(EXPECTED))
def test_reaction(status: str) -> None:
    action, _ = EXPECTED[status]
    assert reaction(session(status)) is action


@pytest.mark.parametrize("status", list(EXPECTED))
def test_pre_send(status: str) -> None:
    _, spanish = EXPECTED[status]
    if spanish is None:
        ensure_can_send(session(status))
        return
    with pytest.raises(SessionNotReadyError) as caught:
        ensure_can_send(session(status))
    assert caught.value.message == spanish
    assert str(caught.value) == spanish
    assert caught.value.message_en
    assert caught.value.status == status
    assert caught.value.instance_id == "sender_51"
    assert caught.value.action is EXPECTED[status][0]


def test_english_messages() -> None:
    english = {}
    for status in ("init", "qr_required", "connecting", "disconnected"):
        with pytest.raises(SessionNotReadyError) as caught:
            ensure_can_send(session(status))
        english[status] = caught.value.message_en
        assert caught.value.message_en != caught.value.message
    assert len(set(english.values())) == 4


def test_error_shows_last_error_message_in_both_languages() -> None:
    failed = session("error")
    failed.last_error_message = "WhatsApp refused this client version as outdated"
    with pytest.raises(SessionNotReadyError) as caught:
        ensure_can_send(failed)
    assert caught.value.message == "WhatsApp refused this client version as outdated"
    assert caught.value.message_en == caught.value.message
