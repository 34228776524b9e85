"""The JSON bodies of the HTTP API, declared once.

Request models validate what comes in (strict types, no unknown fields);
response models only describe what goes out. Both feed the OpenAPI document,
so the document and the checks cannot disagree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from service.domain import contract, validation

StatusText = Literal["init", "qr_required", "connecting", "connected", "disconnected", "error"]
QRStatusText = Literal["none", "generated", "expired", "used"]
MessageStatusText = Literal["pending", "sent", "failed", "unknown", "delivered", "read"]
EventTypeText = Literal["session.updated", "session.deleted", "message.updated"]
LegacyStatusText = Literal["INIT", "QR_REQUIRED", "AUTHENTICATED", "READY", "DISCONNECTED", "ERROR"]
DisconnectReasonText = Literal["LOGOUT", "NETWORK", "TIMEOUT", "UNKNOWN"]

# The patterns and lengths say in JSON Schema what ``validation`` accepts, so
# that generated clients and fuzzers know it; only ``validation`` checks them
# (the same functions and messages as gRPC), pydantic checks types and fields.
INSTANCE_ID_PATTERN = f"^{validation.INSTANCE_ID.pattern}$"
_SEP = r"[\s()-]*"
#: +digits in international format; spaces, dashes and parentheses are ignored.
PHONE_PATTERN = rf"^{_SEP}\+?{_SEP}[1-9](?:{_SEP}[0-9]){{6,14}}{_SEP}$"
_JID = r"[0-9]{5,20}(?:-[0-9]{1,20})?@(?:s\.whatsapp\.net|g\.us)"
RECIPIENT_PATTERN = rf"^(?:{PHONE_PATTERN[1:-1]}|{_JID})$"
#: Not blank.
TEXT_PATTERN = r"\S"
_NO_CONTROL = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
#: Not blank, no control characters.
KEY_PATTERN = rf"^{_NO_CONTROL}*[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f\s]{_NO_CONTROL}*$"

#: A message id as Send gave it (a UUID); ``validation.message_id`` checks it.
MESSAGE_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,128}$"
#: A sequence number of the event log, as Last-Event-ID carries it.
SEQUENCE_PATTERN = r"^[0-9]{1,19}$"
#: The start of an instance_id: a stream's filter.
PREFIX_PATTERN = f"^[{contract.INSTANCE_ID_REST}]{{0,{contract.INSTANCE_ID_MAX}}}$"
_INSTANCE_ID: JsonDict = {"pattern": INSTANCE_ID_PATTERN}
_PHONE: JsonDict = {"pattern": PHONE_PATTERN}
_TIMESTAMP: JsonDict = {"format": "date-time", "examples": ["2026-01-04T12:34:56Z"]}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionBody(_Request):
    instance_id: str = Field(json_schema_extra=_INSTANCE_ID, examples=["sender_51"])


class SendBody(_Request):
    to: str = Field(
        json_schema_extra={"pattern": RECIPIENT_PATTERN},
        description="A phone number in international format or a WhatsApp JID.",
        examples=["+5491100000000"],
    )
    text: str = Field(
        json_schema_extra={"pattern": TEXT_PATTERN, "maxLength": validation.MAX_TEXT},
        examples=["hola"],
    )
    idempotency_key: str | None = Field(
        default=None,
        json_schema_extra={"pattern": KEY_PATTERN, "maxLength": validation.MAX_IDEMPOTENCY_KEY},
        description="Repeating a key returns the first result and sends nothing again; "
        "the Idempotency-Key header does the same.",
    )


class PairPhoneBody(_Request):
    phone_number: str = Field(json_schema_extra=_PHONE, examples=["+5491122334455"])


class ConnectedEvent(_Request):
    instance_id: str = Field(json_schema_extra=_INSTANCE_ID, examples=["sender_51"])
    phone_number: str = Field(json_schema_extra=_PHONE, examples=["+5491122334455"])


class DisconnectedEvent(_Request):
    instance_id: str = Field(json_schema_extra=_INSTANCE_ID, examples=["sender_51"])
    reason: DisconnectReasonText
    message: str | None = Field(
        default=None,
        json_schema_extra={"pattern": TEXT_PATTERN, "maxLength": validation.MAX_ERROR_MESSAGE},
    )


class EmptyBody(_Request):
    """Routes that take no input accept no body or an empty object."""


class ListQuery(BaseModel):
    """The query of ``GET /sessions``; strings are converted, unknown parameters ignored."""

    page_size: int = Field(
        default=0,
        description=f"Sessions per page, 1 to {validation.MAX_PAGE_SIZE}; "
        f"0 or absent: {validation.DEFAULT_PAGE_SIZE}.",
        json_schema_extra={"minimum": 0, "maximum": validation.MAX_PAGE_SIZE},
    )
    page_token: str = Field(default="", description="next_page_token of the previous page.")
    status: StatusText | None = Field(default=None, description="Only sessions in this status.")


class EventsQuery(BaseModel):
    """The query of ``GET /events``; strings are converted, unknown parameters ignored."""

    after: int | None = Field(
        default=None,
        description="Resume: every event after this sequence number, instead of the current "
        "state first. The Last-Event-ID header, which a reconnecting EventSource sends, wins.",
        json_schema_extra={"minimum": 0, "maximum": validation.MAX_SEQUENCE},
    )
    status: StatusText | None = Field(
        default=None,
        description="Only sessions in this status: the session events that bring a session "
        "into it, keep it there or take it out; no message events.",
    )
    instance_id_prefix: str = Field(
        default="",
        description="Only sessions (and their messages) whose instance_id starts with this.",
        json_schema_extra={"pattern": PREFIX_PATTERN},
    )
    types: str = Field(
        default="",
        description="Only these event types, comma-separated: session.updated, "
        "session.deleted, message.updated; empty for all.",
    )


class SessionJSON(_Response):
    """Seed 004's ``WhatsAppSession``: every field present, ``null`` when absent."""

    id: int
    instance_id: str
    phone_number: str | None
    status: StatusText
    qr_status: QRStatusText
    qr_string: str | None = Field(description="A PNG data URL of the pairing code.")
    qr_generated_at: str | None = Field(json_schema_extra=_TIMESTAMP)
    qr_expires_at: str | None = Field(json_schema_extra=_TIMESTAMP)
    connected_at: str | None = Field(json_schema_extra=_TIMESTAMP)
    disconnected_at: str | None = Field(json_schema_extra=_TIMESTAMP)
    last_error_code: str | None
    last_error_message: str | None
    created_at: str = Field(json_schema_extra=_TIMESTAMP)
    updated_at: str = Field(json_schema_extra=_TIMESTAMP)
    revision: int = Field(description="+1 on every committed change of this session.")


class MessageJSON(_Response):
    """A message a session sent, and where it stands (forward only)."""

    message_id: str
    instance_id: str
    session_id: int = Field(description="The id of the session incarnation that sent it.")
    idempotency_key: str | None
    to: str
    status: MessageStatusText
    whatsapp_message_id: str | None
    error_code: str | None
    error_message: str | None
    accepted_at: str = Field(json_schema_extra=_TIMESTAMP)
    updated_at: str = Field(json_schema_extra=_TIMESTAMP)
    delivered_at: str | None = Field(json_schema_extra=_TIMESTAMP)
    read_at: str | None = Field(json_schema_extra=_TIMESTAMP)


class EventJSON(_Response):
    """One event of the log: ``session`` for session events, ``message`` for message events."""

    sequence: int = Field(description="Strictly increasing in commit order; resume after it.")
    id: str = Field(description="evt_ and 32 hex digits: stable wherever it is read.")
    type: EventTypeText
    occurred_at: str = Field(json_schema_extra=_TIMESTAMP)
    session: SessionJSON | None = None
    message: MessageJSON | None = None


class CheckpointJSON(_Response):
    """How far a list-wide stream has read the log: resume after ``sequence``."""

    sequence: int


class QRResponse(_Response):
    qr_string: str
    qr_expires_at: str = Field(json_schema_extra=_TIMESTAMP)
    session: SessionJSON


class PairPhoneResponse(_Response):
    linking_code: str
    session: SessionJSON


class SendResponse(_Response):
    message_id: str
    whatsapp_message_id: str | None
    status: MessageStatusText
    accepted_at: str = Field(json_schema_extra=_TIMESTAMP)
    replayed: bool


class SessionPage(_Response):
    sessions: list[SessionJSON]
    next_page_token: str | None = Field(description="null on the last page.")


class Health(_Response):
    #: ``not_serving`` (with status 503): with several nodes, this node lost its database.
    status: Literal["serving", "not_serving"]


class ErrorJSON(_Response):
    """Seed 003's error body, plus the ErrorInfo metadata under ``details``."""

    error: Literal[True]
    code: str = Field(examples=["SESSION_NOT_FOUND"])
    message: str
    details: dict[str, str]


class EndEvent(_Response):
    """The data of the final ``end`` event of a stream."""

    reason: Literal["deleted", "shutdown", "expired"]
    message: str


class LegacySendBody(_Request):
    """``POST /send`` of the old single-session service: ``cliente_id`` is accepted and ignored."""

    to: str = Field(json_schema_extra={"pattern": RECIPIENT_PATTERN}, examples=["+5491100000000"])
    message: str | None = Field(
        default=None,
        json_schema_extra={"pattern": TEXT_PATTERN, "maxLength": validation.MAX_TEXT},
        description="The text (the old name); `text` works too.",
    )
    text: str | None = Field(
        default=None,
        json_schema_extra={"pattern": TEXT_PATTERN, "maxLength": validation.MAX_TEXT},
    )
    cliente_id: int | str | None = Field(default=None, description="Accepted and ignored.")
    idempotency_key: str | None = Field(
        default=None,
        json_schema_extra={"pattern": KEY_PATTERN, "maxLength": validation.MAX_IDEMPOTENCY_KEY},
    )


class LegacyStatus(_Response):
    """The old service's answer: its status word, and the session in the contract's form."""

    status: LegacyStatusText
    session: SessionJSON
    qr_string: str | None = None
    qr_expires_at: str | None = Field(default=None, json_schema_extra=_TIMESTAMP)
