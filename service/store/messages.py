"""A recorded Send: the intent to send a message, then its outcome."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from service.domain.contract import MessageStatus


@dataclass(frozen=True, slots=True)
class Message:
    """One recorded Send."""

    id: str
    session_id: int
    #: The session's instance_id (a node writing the message must own that session).
    instance_id: str
    idempotency_key: str | None
    recipient: str
    text: str
    status: MessageStatus
    accepted_at: datetime
    #: A digest of what was asked (recipient and text), to tell a reused key apart.
    request_digest: str = ""
    whatsapp_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


def request_digest(to: str, text: str) -> str:
    """What a Send asked for, in 64 hex digits: a reused idempotency key must ask the same."""
    return hashlib.sha256(f"{to}\x00{text}".encode()).hexdigest()
