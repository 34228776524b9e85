"""The event log's entries and the one JSON codec of the resources they carry.

Every committed change of a session or of a message's status is appended to
the log, in the transaction that commits it, as an ``Event``: its place in the
log (``sequence``, strictly increasing in commit order), a stable id, its type
(``session.updated``, ``session.deleted``, ``message.updated``), when it was
committed, and the resource after the change as JSON. The JSON is the one the
HTTP API serves (seed 004's session, every field present, ``null`` when
absent; timestamps RFC 3339 in UTC with ``Z``), written here once and read
back here for the gRPC surface.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from service.domain import contract
from service.domain.contract import (
    MESSAGE_UPDATED,
    SESSION_DELETED,
    SESSION_UPDATED,
    Status,
    event_type_text,
    message_status_text,
    qr_status_text,
    status_text,
)
from service.domain.states import Session
from service.store.messages import Message

SESSION_UPDATED_TEXT = event_type_text(SESSION_UPDATED)
SESSION_DELETED_TEXT = event_type_text(SESSION_DELETED)
MESSAGE_UPDATED_TEXT = event_type_text(MESSAGE_UPDATED)
SESSION_TYPES = frozenset({SESSION_UPDATED_TEXT, SESSION_DELETED_TEXT})
#: Event ids: 128 random bits, from a generator seeded by the system's randomness (an id
#: is unique, not secret; this is far cheaper per event than a system call).
_IDS = random.Random()

_NO_OFFSET = timedelta(0)
_SESSION_TIMES = ("qr_generated_at", "qr_expires_at", "connected_at", "disconnected_at")
_SESSION_ERRORS = ("last_error_code", "last_error_message")


# Times.


def rfc3339(value: datetime) -> str:
    """``2026-01-04T12:34:56Z``, with milliseconds or microseconds only when present."""
    if value.utcoffset() != _NO_OFFSET:
        value = value.astimezone(UTC)
    micro = value.microsecond
    digits = "seconds" if micro == 0 else "milliseconds" if micro % 1000 == 0 else "microseconds"
    return value.isoformat(timespec=digits)[:-6] + "Z"  # "+00:00" written as "Z"


def _optional_time(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def json_text(body: Any) -> str:
    """Compact JSON, UTF-8 as is: what every surface sends and the log stores."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


# Sessions.


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
    for name in _SESSION_TIMES:
        body[name] = _optional_time(getattr(s, name))
    for name in _SESSION_ERRORS:
        body[name] = getattr(s, name)
    body["created_at"] = rfc3339(s.created_at)
    body["updated_at"] = rfc3339(s.updated_at)
    body["revision"] = s.revision
    return body


def session_text(s: Session) -> str:
    """``session_json`` as JSON text."""
    return json_text(session_json(s))


def session_from_json(body: dict[str, Any]) -> Session:
    """The session ``session_json`` wrote."""
    return Session(
        id=body["id"],
        instance_id=body["instance_id"],
        status=contract.status_from_text(body["status"]),
        qr_status=contract.qr_status_from_text(body["qr_status"]),
        created_at=_time(body["created_at"]),  # type: ignore[arg-type]
        updated_at=_time(body["updated_at"]),  # type: ignore[arg-type]
        revision=body["revision"],
        phone_number=body["phone_number"],
        qr_string=body["qr_string"],
        qr_generated_at=_time(body["qr_generated_at"]),
        qr_expires_at=_time(body["qr_expires_at"]),
        connected_at=_time(body["connected_at"]),
        disconnected_at=_time(body["disconnected_at"]),
        last_error_code=body["last_error_code"],
        last_error_message=body["last_error_message"],
    )


# Messages.


def message_json(m: Message) -> dict[str, Any]:
    """The JSON object of a message as it stands (the message text is not part of it)."""
    return {
        "message_id": m.id,
        "instance_id": m.instance_id,
        "session_id": m.session_id,
        "idempotency_key": m.idempotency_key,
        "to": m.recipient,
        "status": message_status_text(m.status),
        "whatsapp_message_id": m.whatsapp_message_id,
        "error_code": m.error_code,
        "error_message": m.error_message,
        "accepted_at": rfc3339(m.accepted_at),
        "updated_at": rfc3339(m.updated_at or m.accepted_at),
        "delivered_at": _optional_time(m.delivered_at),
        "read_at": _optional_time(m.read_at),
    }


def message_from_json(body: dict[str, Any]) -> Message:
    """The message ``message_json`` wrote (without its text, which it does not carry)."""
    return Message(
        id=body["message_id"],
        session_id=body["session_id"],
        instance_id=body["instance_id"],
        idempotency_key=body["idempotency_key"],
        recipient=body["to"],
        text="",
        status=contract.message_status_from_text(body["status"]),
        accepted_at=_time(body["accepted_at"]),  # type: ignore[arg-type]
        whatsapp_message_id=body["whatsapp_message_id"],
        error_code=body["error_code"],
        error_message=body["error_message"],
        updated_at=_time(body["updated_at"]),
        delivered_at=_time(body["delivered_at"]),
        read_at=_time(body["read_at"]),
    )


# Events.


@dataclass(frozen=True, slots=True)
class Change:
    """A change to append to the log, in the transaction that commits it."""

    type: str
    occurred_at: datetime
    instance_id: str
    session_id: int
    #: Session events: the session's status after the change, and before it (None: created).
    status: str | None
    previous_status: str | None
    #: The resource after the change, as JSON text.
    data: str

    def appended(self, sequence: int) -> Event:
        """The event this change is once the log gave it ``sequence``."""
        return Event(
            sequence=sequence,
            id=f"evt_{_IDS.getrandbits(128):032x}",
            type=self.type,
            occurred_at=self.occurred_at,
            instance_id=self.instance_id,
            session_id=self.session_id,
            status=self.status,
            previous_status=self.previous_status,
            data=self.data,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the log: a committed change and the resource after it."""

    sequence: int
    #: ``evt_`` and 32 hex digits: stable wherever the event is read or delivered.
    id: str
    #: ``session.updated``, ``session.deleted`` or ``message.updated``.
    type: str
    occurred_at: datetime
    instance_id: str
    session_id: int
    status: str | None
    previous_status: str | None
    data: str = field(repr=False)

    @property
    def about_session(self) -> bool:
        return self.type in SESSION_TYPES


def session_updated(session: Session, previous: Status | None) -> Change:
    """A session created (``previous`` None) or changed from status ``previous``."""
    return Change(
        type=SESSION_UPDATED_TEXT,
        occurred_at=session.updated_at,
        instance_id=session.instance_id,
        session_id=session.id,
        status=status_text(session.status),
        previous_status=None if previous is None else status_text(previous),
        data=session_text(session),
    )


def session_deleted(session: Session, at: datetime) -> Change:
    """A session deleted at ``at``; it is carried as it was last committed."""
    status = status_text(session.status)
    return Change(
        type=SESSION_DELETED_TEXT,
        occurred_at=at,
        instance_id=session.instance_id,
        session_id=session.id,
        status=status,
        previous_status=status,
        data=session_text(session),
    )


def message_updated(message: Message) -> Change:
    """A message accepted, or whose status moved, as it stands after the change."""
    return Change(
        type=MESSAGE_UPDATED_TEXT,
        occurred_at=message.updated_at or message.accepted_at,
        instance_id=message.instance_id,
        session_id=message.session_id,
        status=None,
        previous_status=None,
        data=json_text(message_json(message)),
    )


@functools.lru_cache(maxsize=4096)
def event_session(event: Event) -> Session:
    """The session a session event carries."""
    return session_from_json(json.loads(event.data))


@functools.lru_cache(maxsize=4096)
def event_message(event: Event) -> Message:
    """The message a message event carries."""
    return message_from_json(json.loads(event.data))


@functools.lru_cache(maxsize=4096)
def event_text(event: Event) -> str:
    """The event as JSON: ``sequence``, ``id``, ``type``, ``occurred_at`` and the resource,
    under ``session`` or ``message`` (the names of the gRPC ``Event``)."""
    resource = "session" if event.about_session else "message"
    return (
        f'{{"sequence":{event.sequence},"id":"{event.id}","type":"{event.type}",'
        f'"occurred_at":"{rfc3339(event.occurred_at)}","{resource}":{event.data}}}'
    )


# Which events a stream carries.


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What a list-wide stream carries; every part is optional."""

    #: Only session events of sessions in this status after or before the change
    #: (so a reader sees a session enter, stay in and leave it), no message events.
    status: str | None = None
    #: Only events of sessions whose instance_id starts with this.
    instance_id_prefix: str = ""
    #: Only these event types (text forms); empty for all.
    types: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        if self.types and event.type not in self.types:
            return False
        if not event.instance_id.startswith(self.instance_id_prefix):
            return False
        if self.status is None:
            return True
        return event.about_session and self.status in (event.status, event.previous_status)

    def shows(self, session: Session) -> bool:
        """Whether the current state includes ``session``."""
        if self.types and not self.types & SESSION_TYPES:
            return False
        if self.status is not None and status_text(session.status) != self.status:
            return False
        return session.instance_id.startswith(self.instance_id_prefix)


# Reading the log.


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where the log stands: the latest sequence number given, and the last one trimmed."""

    last: int
    trimmed: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events read from the log after a sequence number, in order, and where the log stands."""

    events: list[Event]
    #: The log was read up to this sequence number: the next page starts after it.
    through: int
    #: The latest sequence number the log had given when it was read.
    last: int
    #: Events up to this sequence number are no longer kept (retention trimmed them).
    trimmed: int
