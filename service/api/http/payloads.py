"""Domain values in their JSON form: seed 004's session, send results, errors.

Enums travel in their text form, timestamps as RFC 3339 in UTC with ``Z``
(0, 3 or 6 fractional digits, as protobuf's JSON mapping writes them).
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

from service.domain.contract import message_status_text, qr_status_text, status_text
from service.domain.errors import ContractError
from service.domain.sessions import SendResult
from service.domain.states import Session

_OPTIONAL_TIMES = ("qr_generated_at", "qr_expires_at", "connected_at", "disconnected_at")
_OPTIONAL_ERRORS = ("last_error_code", "last_error_message")


def rfc3339(value: datetime) -> str:
    """``2026-01-04T12:34:56Z``, with milliseconds or microseconds only when present."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    micro = value.microsecond
    if micro == 0:
        return text + "Z"
    if micro % 1000 == 0:
        return f"{text}.{micro // 1000:03d}Z"
    return f"{text}.{micro:06d}Z"


def _optional_time(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


@functools.lru_cache(maxsize=4096)
def session_json(s: Session) -> dict[str, Any]:
    """The JSON object of one committed state, in seed 004's field order.

    Built once per state (states are immutable) and shared: never modify it.
    """
    body: dict[str, Any] = {
        "id": s.id,
        "instance_id": s.instance_id,
        "phone_number": s.phone_number,
        "status": status_text(s.status),
        "qr_status": qr_status_text(s.qr_status),
        "qr_string": s.qr_string,
    }
    for name in _OPTIONAL_TIMES:
        body[name] = _optional_time(getattr(s, name))
    for name in _OPTIONAL_ERRORS:
        body[name] = getattr(s, name)
    body["created_at"] = rfc3339(s.created_at)
    body["updated_at"] = rfc3339(s.updated_at)
    body["revision"] = s.revision
    return body


@functools.lru_cache(maxsize=4096)
def session_bytes(s: Session) -> bytes:
    """``session_json`` encoded, shared by every reply and event stream that sends it."""
    return encode(session_json(s))


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
