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
    #: When its status last changed (``accepted_at`` until then).
    updated_at: datetime | None = None
    #: When WhatsApp reports it delivered, then read.
    delivered_at: datetime | None = None
    read_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.updated_at is None:  # not changed since it was accepted
            object.__setattr__(self, "updated_at", self.accepted_at)


def request_digest(to: str, text: str) -> str:
    """What a Send asked for, in 64 hex digits: a reused idempotency key must ask the same."""
    return hashlib.sha256(f"{to}\x00{text}".encode()).hexdigest()
