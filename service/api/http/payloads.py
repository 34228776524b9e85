"""Domain values in their JSON form: seed 004's session, messages, send results, errors.

The resources (a session, a message) have one JSON codec, ``service.domain.events``,
shared with the event log; this module adds the HTTP API's own bodies. Enums
travel in their text form, timestamps as RFC 3339 in UTC with ``Z`` (0, 3 or
6 fractional digits, as protobuf's JSON mapping writes them).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from service.domain.contract import message_status_text
from service.domain.errors import ContractError
from service.domain.events import message_json, rfc3339, session_json, session_text
from service.domain.sessions import SendResult
from service.domain.states import Session

__all__ = ["encode", "error_json", "message_json", "send_json", "session_bytes", "session_json"]


@functools.lru_cache(maxsize=4096)
def session_bytes(s: Session) -> bytes:
    """``session_json`` encoded, shared by every reply and event stream that sends it."""
    return session_text(s).encode()


def send_json(result: SendResult) -> dict[str, Any]:
    message = result.message
    return {
        "message_id": message.id,
        "whatsapp_message_id": message.whatsapp_message_id,
        "status": message_status_text(message.status),
        "accepted_at": rfc3339(message.accepted_at),
        "replayed": result.replayed,
    }


def error_json(error: ContractError) -> dict[str, Any]:
    """Seed 003's error body with the ErrorInfo metadata under ``details``."""
    return {
        "error": True,
        "code": error.code,
        "message": error.message,
        "details": dict(error.metadata),
    }


def encode(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
