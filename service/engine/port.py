"""The engine port: the commands the Session Manager gives a WhatsApp engine,
and the one way an engine reports back.

Commands flow down: the domain calls ``Engine`` methods, each naming the
session incarnation it means (``SessionRef``). Facts flow up: the engine
reports what happened as a ``states`` event through the one ``Report``
callable it was built with; the state machine decides what the event changes.
The engine never sees the domain, and the domain never waits on a report to
learn a command's answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from service.domain.contract import MessageStatus
from service.domain.states import EngineEvent, SessionRef

#: Where an engine reports a fact about a session; raises the contract error
#: when the session refuses it (deleted, or a state that does not allow it), and
#: any other exception when the fact could not be stored (a storage failure).
Report = Callable[[SessionRef, EngineEvent], Awaitable[object]]


class EngineError(Exception):
    """The engine or WhatsApp refused or failed an operation.

    ``definite`` says whether the operation surely did not happen. A message
    whose send timed out, or whose worker died during the call, may have
    reached WhatsApp: that failure is not definite.
    """

    def __init__(self, code: str, message: str, *, definite: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.definite = definite


class Engine(Protocol):
    """A WhatsApp engine: pairs devices, keeps them connected, sends messages."""

    #: Whether a code shown before a restart can still be scanned after it.
    resumes_pairing: bool

    async def start_pairing(self, session: SessionRef) -> None:
        """Start showing pairing codes, replacing any pairing under way.

        Codes are reported as ``QRShown``. Raises EngineError when no pairing
        can be started.
        """

    async def pair_phone(self, session: SessionRef, phone_number: str) -> str:
        """WhatsApp's 8-character linking code for ``phone_number``.

        Called while pairing is under way (after ``start_pairing``). Raises
        EngineError when WhatsApp gives no code.
        """

    async def stop_pairing(self, session: SessionRef) -> None:
        """Stop showing pairing codes for the session, if any are shown."""

    async def restore(self, session: SessionRef, phone_number: str | None) -> None:
        """Reconnect a paired device (after a restart); the result is reported."""

    async def send(self, session: SessionRef, to: str, text: str) -> str:
        """Send a text message; returns WhatsApp's message id or raises EngineError."""

    async def logout(self, session: SessionRef) -> None:
        """Unlink the device from WhatsApp and forget its credentials."""

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """Forget the credentials of every session incarnation not in ``kept``.

        Recovery at start-up: completes a logout or a deletion that was
        committed but whose effect a crash interrupted.
        """

    def hold(self, instance_id: str, until: float, epoch: int) -> None:
        """Run ``instance_id`` only until ``until`` (``service.clock.boottime()`` seconds),
        under the lease ``epoch``.

        The node that runs this engine holds the session's lease until then.
        Once it passes, the session's connection ends by itself, with no
        graceful close, even if this process is frozen; nothing about it is
        reported and nothing restarts, and a new connection is refused
        (``LEASE_EXPIRED``). Each call replaces the session's deadline; a new
        epoch means a new lease, so a connection started under an older one
        ends. A session with no hold runs with no deadline only on an engine
        never given any hold (one node). Cheap, and never blocks.
        """

    def revoke(self, instance_id: str) -> None:
        """The node lost the session's lease: from this instant nothing about it is
        reported, nothing restarts or starts, and its connection is told to end at
        once. Never blocks; ``release`` then waits for the connection to end."""

    async def release(self, session: SessionRef) -> None:
        """Hand the session over to another node: stop its connection, report
        nothing, and keep its credentials for the node that takes it."""

    async def close(self) -> None:
        """Stop every connection; called once at shutdown."""


class Phone(Protocol):
    """The simulated phone and WhatsApp, driven by ``SimulatorService``."""

    async def scan(self, session: SessionRef, phone_number: str, hold_handshake: bool) -> None: ...

    async def complete_handshake(self, session: SessionRef) -> None: ...

    async def drop_network(self, session: SessionRef, hold_reconnect: bool) -> None: ...

    async def unlink(self, session: SessionRef) -> None: ...

    async def fail(self, session: SessionRef, code: str, message: str) -> None: ...

    async def inject_fault(self, session: SessionRef, fault: str) -> None: ...

    async def receipt(
        self,
        session: SessionRef,
        whatsapp_message_id: str,
        status: MessageStatus,
        code: str = "",
        message: str = "",
    ) -> None:
        """WhatsApp reports the message delivered, read or (``code``, ``message``) failed."""


EngineFactory = Callable[[Report], Engine]
