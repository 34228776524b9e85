"""The simulated engine: a deterministic phone and WhatsApp, for tests and demos.

It behaves like the real engine towards the Session Manager: pairing shows a
first code valid for 60 s, then rotates to a new code every 20 s, six codes
in all (durations configurable), and reports everything as ``states`` events
through its one ``Report``. On command (``SimulatorService``) the phone scans, the
handshake completes, the network drops and comes back, the phone unlinks the
device, or the session fails for good; and WhatsApp reports a sent message
delivered, read, or failed after all. Codes are realistic whatsmeow pairing
payloads, derived from the instance id and a counter so runs are repeatable.

In a worker the simulated engine keeps credentials like the real one: a
completed pairing records the device (its phone number) in the worker's
credential location, and ``restore`` without a recorded device fails with
``NO_CREDENTIALS``. In the server's own process it keeps devices in memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from service.clock import Clock
from service.domain import states
from service.domain.contract import LOGOUT, NETWORK, MessageStatus
from service.domain.receipts import MessageReceipt
from service.domain.states import SessionRef
from service.engine.credentials import DeviceStore
from service.engine.port import EngineError, Report

log = logging.getLogger(__name__)

DEFAULT_PHONE = "+15550000000"


@dataclass(frozen=True, slots=True)
class PairingTimes:
    """How long pairing codes live: whatsmeow's timing by default."""

    first: float = 60.0
    rotation: float = 20.0
    codes: int = 6
    #: The next code is shown this long before the current one expires, so that a
    #: shown code never lapses while pairing goes on.
    lead: float = 1.0


@dataclass(slots=True)
class _Device:
    phone_number: str | None = None
    #: The phone number recorded in the worker's credentials (written or read), if any.
    recorded: str | None = None
    #: The phone that asked for a linking code; it is the one that links.
    linking_phone: str | None = None
    rotation: asyncio.Task[None] | None = None
    faults: set[str] = field(default_factory=set)


LINKING_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"  # whatsmeow's: no 0, O, I, U


def linking_code(instance_id: str, phone_number: str, serial: int) -> str:
    """An 8-character linking code shaped like WhatsApp's."""
    digest = hashlib.sha256(f"{instance_id}:{phone_number}:{serial}".encode()).digest()
    return "".join(LINKING_ALPHABET[b % len(LINKING_ALPHABET)] for b in digest[:8])


def pairing_payload(instance_id: str, serial: int) -> str:
    """A pairing payload shaped like whatsmeow's: ``ref,noise_key,identity_key,adv_secret``."""

    def part(label: str, size: int) -> str:
        digest = hashlib.sha256(f"{instance_id}:{serial}:{label}".encode()).digest()
        return base64.b64encode(digest[:size]).decode()

    return f"2@{part('ref', 24)},{part('noise', 32)},{part('identity', 32)},{part('adv', 32)}"


class SimulatedEngine:
    """``Engine`` and ``Phone`` in one: the simulated WhatsApp of every session."""

    resumes_pairing = True

    def __init__(
        self,
        report: Report,
        clock: Clock,
        times: PairingTimes | None = None,
        first_serial: int = 1,
        devices: DeviceStore | None = None,
    ) -> None:
        self._report = report
        #: Where a worker's paired device is recorded; ``None`` in the server's process.
        self._stored = devices
        self._clock = clock
        self._times = times or PairingTimes()
        self._devices: dict[SessionRef, _Device] = {}
        #: Codes are numbered from here; a worker starts where no earlier one did.
        self._serial = itertools.count(first_serial)

    def _device(self, session: SessionRef) -> _Device:
        return self._devices.setdefault(session, _Device())

    # Engine.

    async def start_pairing(self, session: SessionRef) -> None:
        device = self._device(session)
        self._stop_rotation(device)
        if "pairing" in device.faults:
            device.faults.discard("pairing")
            raise EngineError("PAIRING_FAILED", "the simulated engine was told to fail pairing")
        expires_at = self._clock.now() + timedelta(seconds=self._times.first)
        await self._report(session, states.QRShown(self._next_code(session), expires_at))
        if self._times.codes > 1:
            device.rotation = asyncio.create_task(self._rotate(session, expires_at))

    def _next_code(self, session: SessionRef) -> str:
        return pairing_payload(session.instance_id, next(self._serial))

    async def _rotate(self, session: SessionRef, expires_at: datetime) -> None:
        lead = timedelta(seconds=min(self._times.lead, self._times.rotation / 2))
        for _ in range(self._times.codes - 1):
            await self._clock.sleep_until(expires_at - lead)
            expires_at = self._clock.now() + timedelta(seconds=self._times.rotation)
            try:
                await self._report(session, states.QRShown(self._next_code(session), expires_at))
            except Exception as error:  # noqa: BLE001 - the session moved on; stop rotating
                log.debug("rotation of %s stopped: %s", session, error)
                return

    def _stop_rotation(self, device: _Device) -> None:
        if device.rotation is not None and device.rotation is not asyncio.current_task():
            device.rotation.cancel()
        device.rotation = None

    async def pair_phone(self, session: SessionRef, phone_number: str) -> str:
        device = self._device(session)
        if device.rotation is None and self._times.codes > 1:
            raise EngineError("NOT_PAIRING", "no pairing is under way for this session")
        device.linking_phone = phone_number
        return linking_code(session.instance_id, phone_number, next(self._serial))

    async def stop_pairing(self, session: SessionRef) -> None:
        self._stop_rotation(self._device(session))

    async def restore(self, session: SessionRef, phone_number: str | None) -> None:
        device = self._device(session)
        if self._stored is not None:
            recorded = await self._stored.read_phone()
            if recorded is None:
                raise EngineError(
                    "NO_CREDENTIALS", "this session has no stored device; scan a new QR code"
                )
            phone_number = device.recorded = recorded
        device.phone_number = phone_number or device.phone_number or DEFAULT_PHONE
        await self._report(session, states.Connected(device.phone_number))

    async def _connected(self, session: SessionRef, phone_number: str) -> None:
        """Record the paired device where a worker keeps credentials, then report it.

        A device already recorded is not written again: a reconnection (after a
        network drop) changes nothing in its credentials, as with whatsmeow, and
        so does not fail while the credentials cannot be written.
        """
        device = self._device(session)
        if self._stored is not None and device.recorded != phone_number:
            await self._stored.write_phone(phone_number)
            device.recorded = phone_number
        await self._report(session, states.Connected(phone_number))

    async def send(self, session: SessionRef, to: str, text: str) -> str:
        device = self._device(session)
        if "send" in device.faults:
            device.faults.discard("send")
            raise EngineError("SEND_REFUSED", "the simulated WhatsApp refused the message")
        digest = hashlib.sha256(f"{session}:{next(self._serial)}".encode()).hexdigest()
        return "3EB0" + digest[:16].upper()

    async def logout(self, session: SessionRef) -> None:
        device = self._devices.pop(session, None)
        if device is not None:
            self._stop_rotation(device)

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        for session in set(self._devices) - kept:
            await self.logout(session)

    def hold(self, instance_id: str, until: float, epoch: int) -> None:
        """Nothing to hold: the in-process engine runs with one node only.

        Its devices live in the server's own process, which no lease outlives;
        several nodes run workers (``--engine simulated-worker``).
        """

    def revoke(self, instance_id: str) -> None:
        """Stop the session's codes at once and forget its device."""
        for session in [s for s in self._devices if s.instance_id == instance_id]:
            self._stop_rotation(self._devices.pop(session))

    async def release(self, session: SessionRef) -> None:
        """Stop the session's codes and forget its device: another node takes it."""
        device = self._devices.pop(session, None)
        if device is not None:
            self._stop_rotation(device)

    async def close(self) -> None:
        for device in self._devices.values():
            self._stop_rotation(device)
        rotations = [d.rotation for d in self._devices.values() if d.rotation is not None]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*rotations, return_exceptions=True)

    # The phone and WhatsApp, on command.

    async def scan(self, session: SessionRef, phone_number: str, hold_handshake: bool) -> None:
        device = self._device(session)
        await self._report(session, states.QRScanned())
        self._stop_rotation(device)
        device.phone_number = phone_number or device.linking_phone or DEFAULT_PHONE
        if not hold_handshake:
            await self._connected(session, device.phone_number)

    async def complete_handshake(self, session: SessionRef) -> None:
        device = self._device(session)
        await self._connected(session, device.phone_number or DEFAULT_PHONE)

    async def drop_network(self, session: SessionRef, hold_reconnect: bool) -> None:
        await self._report(session, states.Disconnected(NETWORK, ""))
        await self._report(session, states.Reconnecting())
        if not hold_reconnect:
            await self.complete_handshake(session)

    async def unlink(self, session: SessionRef) -> None:
        await self._report(session, states.Disconnected(LOGOUT, ""))
        device = self._devices.pop(session, None)
        if device is not None:
            self._stop_rotation(device)

    async def fail(self, session: SessionRef, code: str, message: str) -> None:
        await self._report(session, states.Failed(code, message))
        self._stop_rotation(self._device(session))

    async def inject_fault(self, session: SessionRef, fault: str) -> None:
        self._device(session).faults.add(fault)

    async def receipt(
        self,
        session: SessionRef,
        whatsapp_message_id: str,
        status: MessageStatus,
        code: str = "",
        message: str = "",
    ) -> None:
        receipt = MessageReceipt(
            (whatsapp_message_id,), status, self._clock.now(), code or None, message or None
        )
        await self._report(session, receipt)
