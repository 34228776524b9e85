"""Validation of every value that comes from outside, in one place.

Each function returns the value in its canonical form or raises the contract
error that names the field; nothing is stored before it passes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Set as AbstractSet

from service.domain import errors
from sessionmanager.v1 import session_pb2

INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PHONE = re.compile(r"\+?[1-9][0-9]{6,14}")
_JID = re.compile(r"[0-9]{5,20}(-[0-9]{1,20})?@(s\.whatsapp\.net|g\.us)")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

MAX_TEXT = 4096
MAX_IDEMPOTENCY_KEY = 128
MAX_ERROR_MESSAGE = 1024
MAX_PAIRING_CODE = 2048
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def _shown(value: str) -> str:
    return value if len(value) <= 80 else value[:77] + "..."


def instance_id(value: str) -> str:
    if not INSTANCE_ID.fullmatch(value):
        raise errors.ContractError(
            session_pb2.ERROR_REASON_INVALID_INSTANCE_ID,
            "instance_id must be 1-64 characters of [A-Za-z0-9][A-Za-z0-9_.-]*, "
            f"got {_shown(value)!r}",
            instance_id=_shown(value),
        )
    return value


def phone_number(value: str, field: str = "phone_number", iid: str = "") -> str:
    """A phone number in international format, returned as ``+digits``."""
    compact = re.sub(r"[\s()-]", "", value)
    if not _PHONE.fullmatch(compact):
        raise errors.invalid_argument(
            field,
            f"{field} must be a phone number in international format, e.g. +5491122334455, "
            f"got {_shown(value)!r}",
            iid,
        )
    return "+" + compact.removeprefix("+")


def recipient(value: str, iid: str) -> str:
    """A phone number (returned as ``+digits``) or a WhatsApp JID (returned as is)."""
    if _JID.fullmatch(value):
        return value
    return phone_number(value, "to", iid)


def _text_field(value: str, field: str, limit: int, iid: str) -> str:
    if not value.strip():
        raise errors.invalid_argument(field, f"{field} must not be empty", iid)
    if len(value) > limit:
        raise errors.invalid_argument(
            field, f"{field} is {len(value)} characters, at most {limit} are allowed", iid
        )
    return value


def text(value: str, iid: str) -> str:
    return _text_field(value, "text", MAX_TEXT, iid)


def idempotency_key(value: str, iid: str) -> str:
    _text_field(value, "idempotency_key", MAX_IDEMPOTENCY_KEY, iid)
    if _CONTROL.search(value):
        raise errors.invalid_argument(
            "idempotency_key", "idempotency_key must not contain control characters", iid
        )
    return value


def pairing_code(value: str, iid: str) -> str:
    _text_field(value, "code", MAX_PAIRING_CODE, iid)
    if _CONTROL.search(value):
        raise errors.invalid_argument("code", "code must not contain control characters", iid)
    return value


def error_code(value: str, iid: str) -> str:
    if not _ERROR_CODE.fullmatch(value):
        raise errors.invalid_argument(
            "code", f"code must match [A-Z][A-Z0-9_]{{0,63}}, got {_shown(value)!r}", iid
        )
    return value


def error_message(value: str, iid: str, field: str = "message") -> str:
    return _text_field(value, field, MAX_ERROR_MESSAGE, iid)


def page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise errors.invalid_argument(
            "page_size", f"page_size must be between 0 and {MAX_PAGE_SIZE}, got {value}"
        )
    return value or DEFAULT_PAGE_SIZE


def enum_value(value: int, allowed: AbstractSet[int], field: str, iid: str = "") -> int:
    if value not in allowed:
        raise errors.invalid_argument(field, f"{field} has no valid value ({value})", iid)
    return value


def encode_page_token(last_instance_id: str) -> str:
    """The opaque token of the page after ``last_instance_id``."""
    return base64.urlsafe_b64encode(last_instance_id.encode()).decode()


def page_token(token: str) -> str:
    """The last ``instance_id`` of the previous page ("" for the first page)."""
    if not token:
        return ""
    try:
        last = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError, UnicodeError):
        last = ""
    if not INSTANCE_ID.fullmatch(last):
        raise errors.invalid_argument("page_token", "page_token is not a token this service gave")
    return last
