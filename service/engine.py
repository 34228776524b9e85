"""The engine port: what the Session Manager asks of a WhatsApp engine, and
what an engine reports back.

An engine owns the WhatsApp connections. The Session Manager calls the
``Engine`` methods; the engine reports what happens through ``EngineEvents``
(the same events the internal ``EngineService`` accepts over gRPC). Reports
are facts: the state machine decides what they change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from service.contract import DisconnectReason
from service.states import Session


class EngineError(Exception):
    """The engine or WhatsApp refused or failed an operation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineEvents(Protocol):
    """What an engine reports about a session; each call commits one transition."""

    async def qr_code(self, instance_id: str, code: str, expires_at: datetime) -> Session: ...

    async def qr_scanned(self, instance_id: str) -> Session: ...

    async def reconnecting(self, instance_id: str) -> Session: ...

    async def connected(self, instance_id: str, phone_number: str) -> Session: ...

    async def disconnected(
        self, instance_id: str, reason: DisconnectReason, message: str = ""
    ) -> Session: ...

    async def failed(self, instance_id: str, code: str, message: str) -> Session: ...


class Engine(Protocol):
    """A WhatsApp engine: pairs devices, keeps them connected, sends messages."""

    #: Whether a code shown before a restart can still be scanned after it.
    resumes_pairing: bool

    def bind(self, events: EngineEvents) -> None:
        """Set where the engine reports; called once before any other method."""

    async def start_pairing(self, instance_id: str) -> None:
        """Start showing pairing codes, replacing any pairing under way.

        Codes arrive through ``EngineEvents.qr_code``. Raises EngineError when
        no pairing can be started.
        """

    async def stop_pairing(self, instance_id: str) -> None:
        """Stop showing pairing codes for the session, if any are shown."""

    async def restore(self, instance_id: str, phone_number: str | None) -> None:
        """Reconnect a paired device (after a restart); the result is reported."""

    async def send(self, instance_id: str, to: str, text: str) -> str:
        """Send a text message; returns WhatsApp's message id or raises EngineError."""

    async def logout(self, instance_id: str) -> None:
        """Unlink the device from WhatsApp and forget its credentials."""

    async def close(self) -> None:
        """Stop every connection; called once at shutdown."""
