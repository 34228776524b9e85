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

from service.domain.contract import DisconnectReason


class EngineError(Exception):
    """The engine or WhatsApp refused or failed an operation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineEvents(Protocol):
    """What an engine reports about a session; each call commits one transition.

    The Session Manager implements it (and returns the committed session); a
    worker process implements it by writing the report to its pipe.
    """

    async def qr_code(self, instance_id: str, code: str, expires_at: datetime) -> object: ...

    async def qr_scanned(self, instance_id: str) -> object: ...

    async def reconnecting(self, instance_id: str) -> object: ...

    async def connected(self, instance_id: str, phone_number: str) -> object: ...

    async def disconnected(
        self,
        instance_id: str,
        reason: DisconnectReason,
        message: str = "",
        code: str | None = None,
    ) -> object: ...

    async def failed(self, instance_id: str, code: str, message: str) -> object: ...

    async def pairing_failed(self, instance_id: str, code: str, message: str) -> object: ...


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

    async def pair_phone(self, instance_id: str, phone_number: str) -> str:
        """WhatsApp's 8-character linking code for ``phone_number``.

        Called while pairing is under way (after ``start_pairing``). Raises
        EngineError when WhatsApp gives no code.
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


class Phone(Protocol):
    """The simulated phone and WhatsApp, driven by ``SimulatorService``."""

    async def scan(self, instance_id: str, phone_number: str, hold_handshake: bool) -> None: ...

    async def complete_handshake(self, instance_id: str) -> None: ...

    async def drop_network(self, instance_id: str, hold_reconnect: bool) -> None: ...

    async def unlink(self, instance_id: str) -> None: ...

    async def fail(self, instance_id: str, code: str, message: str) -> None: ...

    async def inject_fault(self, instance_id: str, fault: str) -> None: ...
