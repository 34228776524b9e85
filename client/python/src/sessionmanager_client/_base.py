"""Every decision the sync and asyncio clients share; the flavours only do I/O.

Here: the channel's settings and retry policy, the request of each call, and
the watch's policy (which states to hand out, when to subscribe again). Like
httpx's ``BaseClient``: ``SessionManagerClient`` (``sync``) and
``AsyncSessionManagerClient`` (``aio``) build nothing themselves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sessionmanager.v1 import session_pb2, session_service_pb2, simulator_service_pb2
from sessionmanager_client.enums import status_number
from sessionmanager_client.errors import SessionManagerClientError, SessionManagerUnavailableError

pb = session_service_pb2
sim = simulator_service_pb2
Session = session_pb2.WhatsAppSession

#: The simulated engine's injectable faults by name (``pairing``, ``send``).
FAULTS = {
    name.removeprefix("FAULT_").lower(): number
    for name, number in sim.Fault.items()
    if number != sim.FAULT_UNSPECIFIED
}

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
SESSION_SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"].full_name

#: Only idempotent reads are retried by the channel, and only on UNAVAILABLE; never
#: Send or any other write. For WatchSession and WatchSessions, gRPC retries only
#: the opening of the stream (before the first message arrives). A Send that
#: carries its idempotency key is retried by the client itself (``SendRetry``).
RETRIED_METHODS = ("GetSession", "ListSessions", "WatchSession", "WatchSessions", "GetMessage")


def service_config(
    max_attempts: int = 4, initial_backoff: float = 0.2, max_backoff: float = 2.0
) -> str:
    """The gRPC service config (JSON) with the retry policy for idempotent reads."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [
                        {"service": SESSION_SERVICE, "method": method} for method in RETRIED_METHODS
                    ],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": f"{initial_backoff}s",
                        "maxBackoff": f"{max_backoff}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


@dataclass(frozen=True)
class TLS:
    """TLS for the channel: PEM files of the root CAs and, for mutual TLS, a client pair."""

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_certificates),
            private_key=read(self.private_key),
            certificate_chain=read(self.certificate_chain),
        )


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to connect: the channel's options and each call's metadata."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: TLS | None = None
    options: Sequence[tuple[str, Any]] = field(default_factory=tuple)
    retry: bool = True

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = []
        if self.retry:
            options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config())]
        options += list(self.options)
        return options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()


@dataclass(frozen=True)
class Backoff:
    """How ``watch`` re-subscribes after UNAVAILABLE: exponential, bounded.

    ``max_attempts`` consecutive failed re-subscriptions (without a message in
    between) end the watch with the last error; ``None`` retries for ever.
    """

    initial: float = 0.2
    maximum: float = 5.0
    multiplier: float = 2.0
    max_attempts: int | None = 20

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1)))


#: How a Send that carries its idempotency key is tried again after UNAVAILABLE.
SEND_RETRY = Backoff(initial=0.2, maximum=2.0, multiplier=2.0, max_attempts=3)


class SendRetry:
    """When a Send is tried again: only with its idempotency key, only on UNAVAILABLE from
    the transport (never a contract error, not even WHATSAPP_ERROR), a few times.

    The server answers a repeated key with the first result and sends nothing again,
    so the retry cannot send a message twice; a Send without a key never is retried.
    """

    def __init__(self, idempotency_key: str | None, backoff: Backoff = SEND_RETRY) -> None:
        self._keyed = idempotency_key is not None
        self._backoff = backoff
        self._failures = 0

    def delay_after(self, error: SessionManagerClientError) -> float | None:
        """Seconds to wait before sending again, or ``None``: the call fails with ``error``."""
        if not self._keyed or not isinstance(error, SessionManagerUnavailableError):
            return None
        self._failures += 1
        limit = self._backoff.max_attempts
        if limit is not None and self._failures > limit:
            return None
        return self._backoff.delay(self._failures)


class StreamCursor:
    """Where a list-wide stream stands: the sequence number of the last event or
    checkpoint received (``None`` until the first one: resuming then starts over
    from the current state). Keep ``sequence`` to resume in another process."""

    def __init__(self, after_sequence: int | None = None) -> None:
        self.sequence = after_sequence

    def admit(self, item: pb.WatchSessionsResponse) -> bool:
        """Whether ``item`` reaches the caller; it never repeats an event nor goes back."""
        kind = item.WhichOneof("item")
        if kind == "session":
            return True
        number = item.event.sequence if kind == "event" else item.checkpoint.sequence
        if self.sequence is not None and number <= self.sequence:
            return False
        self.sequence = number
        return True


@dataclass(frozen=True)
class Page:
    """One page of ListSessions: the sessions and the token of the next page ('' at the end)."""

    sessions: list[Session]
    next_page_token: str


class WatchCursor:
    """Which states of a watch reach the caller: it follows ``(id, revision)``.

    A state of the incarnation already followed passes only with a higher
    revision (a re-subscription starts with the current state, already seen).
    A state with another ``id`` is a new incarnation (the session was deleted
    and created again, e.g. while the watch was re-subscribing): it passes
    whatever its revision, and from then on only that incarnation is followed.
    """

    def __init__(self) -> None:
        self.id: int | None = None
        self.revision = 0

    def admit(self, session: Session) -> bool:
        if session.id == self.id and session.revision <= self.revision:
            return False
        self.id, self.revision = session.id, session.revision
        return True


class Resubscription:
    """When a watch subscribes again: after UNAVAILABLE only, with bounded backoff."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self._failures = 0

    def received(self) -> None:
        """A state arrived: the connection works again."""
        self._failures = 0

    def delay_after(self, error: SessionManagerClientError) -> float | None:
        """Seconds to wait before subscribing again, or ``None``: the watch ends with ``error``.

        Any contract error ends it (``SessionNotFoundError`` once the session
        is deleted); so do too many failed attempts in a row.
        """
        if not isinstance(error, SessionManagerUnavailableError):
            return None
        self._failures += 1
        limit = self._backoff.max_attempts
        if limit is not None and self._failures > limit:
            return None
        return self._backoff.delay(self._failures)


# The request of each call.


def get_request(instance_id: str) -> pb.GetSessionRequest:
    return pb.GetSessionRequest(instance_id=instance_id)


def qr_request(instance_id: str) -> pb.RequestQRRequest:
    return pb.RequestQRRequest(instance_id=instance_id)


def pair_phone_request(instance_id: str, phone_number: str) -> pb.PairPhoneRequest:
    return pb.PairPhoneRequest(instance_id=instance_id, phone_number=phone_number)


def send_request(
    instance_id: str, to: str, text: str, idempotency_key: str | None
) -> pb.SendRequest:
    request = pb.SendRequest(instance_id=instance_id, to=to, text=text)
    if idempotency_key is not None:
        request.idempotency_key = idempotency_key
    return request


def disconnect_request(instance_id: str) -> pb.DisconnectRequest:
    return pb.DisconnectRequest(instance_id=instance_id)


def create_request(instance_id: str) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(instance_id=instance_id)


def delete_request(instance_id: str) -> pb.DeleteSessionRequest:
    return pb.DeleteSessionRequest(instance_id=instance_id)


def list_request(page_size: int, page_token: str, status: str | None) -> pb.ListSessionsRequest:
    request = pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
    if status is not None:
        request.status = status_number(status)
    return request


def watch_request(instance_id: str) -> pb.WatchSessionRequest:
    return pb.WatchSessionRequest(instance_id=instance_id)


def fault_request(instance_id: str, fault: str) -> sim.InjectFaultRequest:
    return sim.InjectFaultRequest(
        instance_id=instance_id, fault=FAULTS.get(fault, sim.FAULT_UNSPECIFIED)
    )


def get_message_request(instance_id: str, message_id: str) -> pb.GetMessageRequest:
    return pb.GetMessageRequest(instance_id=instance_id, message_id=message_id)


def event_type_number(text: str) -> pb.EventType.ValueType:
    """``session.updated`` -> ``EVENT_TYPE_SESSION_UPDATED``."""
    try:
        return pb.EventType.Value("EVENT_TYPE_" + text.replace(".", "_").upper())
    except ValueError:
        raise ValueError(f"no event type {text!r}") from None


def watch_sessions_request(
    after_sequence: int | None, status: str | None, instance_id_prefix: str, types: Sequence[str]
) -> pb.WatchSessionsRequest:
    request = pb.WatchSessionsRequest(
        instance_id_prefix=instance_id_prefix, types=[event_type_number(t) for t in types]
    )
    if after_sequence is not None:
        request.after_sequence = after_sequence
    if status is not None:
        request.status = status_number(status)
    return request
