"""What the sync and asyncio clients share: channel set-up, metadata, retries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sessionmanager.v1 import session_pb2, session_service_pb2, simulator_service_pb2

#: The simulated engine's injectable faults by name (``pairing``, ``send``).
FAULTS = {
    name.removeprefix("FAULT_").lower(): number
    for name, number in simulator_service_pb2.Fault.items()
    if number != simulator_service_pb2.FAULT_UNSPECIFIED
}

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
SESSION_SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name

#: Only idempotent reads are retried, and only on UNAVAILABLE; never Send or
#: any other write. For WatchSession, gRPC retries only the opening of the
#: stream (before the first message arrives).
RETRIED_METHODS = ("GetSession", "ListSessions", "WatchSession")


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


@dataclass(frozen=True)
class Page:
    """One page of ListSessions: the sessions and the token of the next page ('' at the end)."""

    sessions: list[session_pb2.WhatsAppSession]
    next_page_token: str


def list_request(
    page_size: int, page_token: str, status: str | None
) -> session_service_pb2.ListSessionsRequest:
    from sessionmanager_client.enums import status_number

    request = session_service_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
    if status is not None:
        request.status = status_number(status)
    return request


def send_request(
    instance_id: str, to: str, text: str, idempotency_key: str | None
) -> session_service_pb2.SendRequest:
    request = session_service_pb2.SendRequest(instance_id=instance_id, to=to, text=text)
    if idempotency_key is not None:
        request.idempotency_key = idempotency_key
    return request
