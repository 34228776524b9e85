"""Validation of every value that comes from outside, in one place.

Each function returns the value in its canonical form or raises the contract
error that names the field; nothing is stored before it passes.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from service.domain import contract, errors
from service.logs import escape_controls
from sessionmanager.v1 import session_pb2

INSTANCE_ID = re.compile(contract.INSTANCE_ID_PATTERN)
_PHONE = re.compile(r"\+?[1-9][0-9]{6,14}")
_JID = re.compile(r"[0-9]{5,20}(-[0-9]{1,20})?@(s\.whatsapp\.net|g\.us)")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: Any control character at all: none belongs in a code, a key or a one-line message.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Letters that draw nothing (the Hangul fillers) and the blank braille pattern.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: The first letter of the Unicode categories that draw something on their own:
#: letters, numbers, punctuation and symbols (emoji are symbols). Marks need a
#: base; separators, controls and format characters (zero-width) draw nothing.
_VISIBLE_CATEGORIES = frozenset("LNPS")
#: The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

MAX_TEXT = 4096
MAX_IDEMPOTENCY_KEY = 128
MAX_ERROR_MESSAGE = 1024
#: In UTF-8 bytes: a QR code (version 40, level M) holds at most 2,331.
MAX_PAIRING_CODE = 2048
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def _shown(value: str) -> str:
    """``value`` as error messages quote it: short, with control characters escaped."""
    return escape_controls(value if len(value) <= 80 else value[:77] + "...")


def _is_visible(char: str) -> bool:
    return unicodedata.category(char)[0] in _VISIBLE_CATEGORIES and char not in _BLANK_LETTERS


def has_visible(value: str) -> bool:
    """Whether ``value`` draws something: one letter, number, punctuation mark or symbol."""
    return any(_is_visible(char) for char in value)


def instance_id(value: str) -> str:
    if not INSTANCE_ID.fullmatch(value):
        raise errors.ContractError(
            session_pb2.ERROR_REASON_INVALID_INSTANCE_ID,
            "instance_id must be 1-64 characters of [A-Za-z0-9][A-Za-z0-9_.-]*, "
            f"got '{_shown(value)}'",
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
            f"got '{_shown(value)}'",
            iid,
        )
    return "+" + compact.removeprefix("+")


def recipient(value: str, iid: str) -> str:
    """A phone number (returned as ``+digits``) or a WhatsApp JID (returned as is)."""
    if _JID.fullmatch(value):
        return value
    return phone_number(value, "to", iid)


def _text_field(value: str, field: str, limit: int, iid: str) -> str:
    """Text a person will read: not empty, not too long, and something visible in it."""
    if not value.strip():
        raise errors.invalid_argument(field, f"{field} must not be empty", iid)
    if len(value) > limit:
        raise errors.invalid_argument(
            field, f"{field} is {len(value)} characters, at most {limit} are allowed", iid
        )
    if not has_visible(value):
        raise errors.invalid_argument(
            field,
            f"{field} must contain something visible, not only spaces, control or "
            f"zero-width characters (got '{_shown(value)}')",
            iid,
        )
    return value


def _no_controls(value: str, field: str, iid: str, allowed: str = "") -> None:
    if any(char not in allowed for char in _CONTROL.findall(value)):
        raise errors.invalid_argument(field, f"{field} must not contain control characters", iid)


def text(value: str, iid: str) -> str:
    """A message's text: newlines and tabs are text, other control characters are not."""
    _text_field(value, "text", MAX_TEXT, iid)
    _no_controls(value, "text", iid, allowed="\n\r\t")
    return value


def idempotency_key(value: str, iid: str) -> str:
    _text_field(value, "idempotency_key", MAX_IDEMPOTENCY_KEY, iid)
    _no_controls(value, "idempotency_key", iid)
    return value


def pairing_code(value: str, iid: str) -> str:
    """The payload of a QR code: it must fit in one (``MAX_PAIRING_CODE`` UTF-8 bytes)."""
    size = len(value.encode())
    if size > MAX_PAIRING_CODE:
        raise errors.invalid_argument(
            "code", f"code is {size} bytes, at most {MAX_PAIRING_CODE} fit in a QR code", iid
        )
    _text_field(value, "code", MAX_PAIRING_CODE, iid)
    _no_controls(value, "code", iid)
    return value


def timestamp(value: timestamp_pb2.Timestamp, field: str, iid: str) -> datetime:
    """A Timestamp as an aware datetime; out of its range (years 1-9999) is INVALID_ARGUMENT."""
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS:
        raise errors.invalid_argument(
            field, f"{field} must be between the years 1 and 9999 (seconds {value.seconds})", iid
        )
    if not 0 <= value.nanos <= 999_999_999:
        raise errors.invalid_argument(
            field, f"{field}.nanos must be between 0 and 999999999, got {value.nanos}", iid
        )
    return value.ToDatetime(tzinfo=UTC)


def error_code(value: str, iid: str) -> str:
    if not _ERROR_CODE.fullmatch(value):
        raise errors.invalid_argument(
            "code", f"code must match [A-Z][A-Z0-9_]{{0,63}}, got '{_shown(value)}'", iid
        )
    return value


def error_message(value: str, iid: str, field: str = "message") -> str:
    """An engine's error message, shown to people: it must say something visible."""
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
