"""The real engine: whatsmeow through neonize, for one session, inside a worker.

This module runs only in an engine worker process (``service.engine.worker``), never
in the server: neonize can kill or hang the process it lives in. neonize is
imported when the first connection starts, not when this module is imported,
so the event mapping below can be tested without it.

whatsmeow's events are turned into the contract's reports by ``map_event``, a
pure function of the event's name and its fields (as ``MessageToDict`` gives
them); every cause gets its own ``last_error_code``. Its receipts for sent
messages become ``MessageReceipt`` reports (``map_receipt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from service.clock import Clock
from service.domain import states
from service.domain.contract import (
    DELIVERED,
    FAILED,
    LOGOUT,
    NETWORK,
    READ,
    TIMEOUT,
    UNKNOWN,
    DisconnectReason,
)
from service.domain.receipts import MessageReceipt
from service.domain.states import SessionRef
from service.engine.credentials import DeviceStore
from service.engine.port import EngineError, Report
from service.engine.protocol import EXIT_DONE, EXIT_RETRY

log = logging.getLogger(__name__)

#: whatsmeow shows the first pairing code for 60 s and each later one for 20 s;
#: neonize does not say so, so the engine keeps the clock.
FIRST_CODE_SECONDS = 60.0
LATER_CODE_SECONDS = 20.0
CALL_TIMEOUT = 30.0

Reading = Literal["qr_scanned", "connected", "disconnected", "failed", "pairing_failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one whatsmeow event means for the session."""

    report: Reading
    reason: DisconnectReason = UNKNOWN
    code: str = ""
    message: str = ""
    #: whatsmeow reconnects by itself after this: the session is connecting.
    reconnects: bool = False
    #: The worker's exit status after reporting, or ``None`` to keep running.
    ends: int | None = None

    @property
    def wipe_credentials(self) -> bool:
        """The device was unlinked: its credentials are worthless (the supervisor wipes them)."""
        return self.report == "disconnected" and self.reason == LOGOUT


_LOGOUT_MESSAGES = {
    "LOGGED_OUT": "The phone unlinked this device; scan a new QR code to connect",
    "MAIN_DEVICE_GONE": "The phone's WhatsApp account is gone (reinstalled or deleted); "
    "scan a new QR code to connect",
    "UNKNOWN_LOGOUT": "WhatsApp logged this device out; scan a new QR code to connect",
}
_UNAVAILABLE = {"SERVICE_UNAVAILABLE", "INTERNAL_SERVER_ERROR"}


def _logged_out(reason: str) -> Outcome:
    return Outcome(
        "disconnected",
        LOGOUT,
        "LOGOUT",
        _LOGOUT_MESSAGES.get(reason, _LOGOUT_MESSAGES["UNKNOWN_LOGOUT"]),
        ends=EXIT_DONE,
    )


def _temporary_ban(fields: dict[str, Any]) -> Outcome:
    why = str(fields.get("Code", "")).replace("_", " ").lower() or "no reason given"
    seconds = int(fields.get("Expire", 0) or 0)
    ends = f"; it ends in {timedelta(seconds=seconds)}" if seconds else ""
    return Outcome(
        "failed",
        code="TEMPORARY_BAN",
        message=f"WhatsApp banned this number temporarily ({why}){ends}",
        ends=EXIT_DONE,
    )


_OUTDATED = Outcome(
    "failed",
    code="CLIENT_OUTDATED",
    message="WhatsApp refused this client version as outdated; upgrade neonize",
    ends=EXIT_DONE,
)


def _connect_failure(fields: dict[str, Any]) -> Outcome:
    reason = str(fields.get("Reason", "GENERIC"))
    detail = str(fields.get("Message", "")) or reason.replace("_", " ").lower()
    if reason in _LOGOUT_MESSAGES:
        return _logged_out(reason)
    if reason == "TEMP_BANNED":
        return _temporary_ban({})
    if reason == "CLIENT_OUTDATED":
        return _OUTDATED
    if reason in _UNAVAILABLE:
        return Outcome(
            "disconnected",
            NETWORK,
            "WHATSAPP_UNAVAILABLE",
            f"WhatsApp is unavailable ({detail}); retrying",
            ends=EXIT_RETRY,
        )
    return Outcome(
        "failed",
        code=f"CONNECT_FAILURE_{reason}",
        message=f"WhatsApp refused the connection: {detail}",
        ends=EXIT_DONE,
    )


def map_event(name: str, fields: dict[str, Any], *, paired: bool) -> Outcome | None:
    """The contract's reading of the whatsmeow event ``name`` with ``fields``.

    ``fields`` is the event as ``MessageToDict(..., preserving_proto_field_name=True)``
    gives it; ``paired`` says whether the device is linked (so a lost connection
    is a disconnect, not the end of a pairing). ``None``: nothing to report.
    """
    match name:
        case "PairStatus":
            if fields.get("Status") == "SUCCESS":
                return Outcome("qr_scanned")
            return Outcome(
                "pairing_failed",
                code="PAIRING_REJECTED",
                message="WhatsApp rejected the pairing: "
                + (fields.get("Error") or "no reason given"),
                ends=EXIT_DONE,
            )
        case "Connected" | "KeepAliveRestored":
            return Outcome("connected")
        case "Disconnected":
            if not paired:
                return Outcome(
                    "pairing_failed",
                    code="PAIRING_ENDED",
                    message="WhatsApp closed the pairing connection; request a new QR code",
                    ends=EXIT_DONE,
                )
            return Outcome(
                "disconnected",
                NETWORK,
                "NETWORK",
                "The network connection to WhatsApp dropped; reconnecting",
                reconnects=True,
            )
        case "KeepAliveTimeout":
            missed = int(fields.get("ErrorCount", 0) or 0)
            return Outcome(
                "disconnected",
                TIMEOUT,
                "KEEPALIVE_TIMEOUT",
                f"WhatsApp stopped answering keepalives ({missed} missed); reconnecting",
                reconnects=True,
            )
        case "LoggedOut":
            return _logged_out(str(fields.get("Reason", "LOGGED_OUT")))
        case "StreamReplaced":
            return Outcome(
                "disconnected",
                UNKNOWN,
                "STREAM_REPLACED",
                "Another client connected with this session's credentials and replaced it; "
                "make sure only one server runs this session",
                ends=EXIT_DONE,
            )
        case "TemporaryBan":
            return _temporary_ban(fields)
        case "ClientOutdated":
            return _OUTDATED
        case "ConnectFailure":
            return _connect_failure(fields)
        case "StreamError":
            return Outcome(
                "disconnected",
                UNKNOWN,
                "STREAM_ERROR",
                f"WhatsApp ended the stream with error {fields.get('Code') or 'unknown'}; "
                "reconnecting",
                ends=EXIT_RETRY,
            )
    return None


#: whatsmeow's receipt types that move a sent message, and where to (a played voice
#: note was heard: read). The others are about this account's own devices or retries.
_RECEIPTS = {"DELIVERED": DELIVERED, "READ": READ, "PLAYED": READ, "SERVER_ERROR": FAILED}


def map_receipt(fields: dict[str, Any], now: datetime) -> MessageReceipt | None:
    """The contract's reading of whatsmeow's ``Receipt`` event (fields as for ``map_event``).

    ``None`` for a receipt that moves no sent message (read on this account's
    own phone, a retry request).
    """
    status = _RECEIPTS.get(str(fields.get("Type", "")))
    ids = tuple(str(message_id) for message_id in fields.get("MessageIDs", ()))
    if status is None or not ids:
        return None
    seconds = int(fields.get("Timestamp", 0) or 0)
    at = datetime.fromtimestamp(seconds, UTC) if seconds > 0 else now
    if status == FAILED:
        return MessageReceipt(
            ids, status, at, "SERVER_ERROR", "WhatsApp could not deliver the message"
        )
    return MessageReceipt(ids, status, at)


#: The neonize event classes the engine listens to, by their proto name.
EVENT_NAMES = (
    "PairStatus",
    "Connected",
    "KeepAliveTimeout",
    "KeepAliveRestored",
    "LoggedOut",
    "StreamReplaced",
    "TemporaryBan",
    "ConnectFailure",
    "ClientOutdated",
    "StreamError",
    "Disconnected",
    "Receipt",
)


def phone_from_jid_user(user: str) -> str:
    return "+" + user.split(":", 1)[0].split(".", 1)[0]


class WhatsmeowEngine:
    """One session's whatsmeow client; ``Engine`` for a worker's only session."""

    resumes_pairing = False

    def __init__(
        self, devices: DeviceStore, report: Report, clock: Clock, end: Callable[[int], None]
    ) -> None:
        self._devices = devices
        self._report = report
        self._clock = clock
        self._end = end
        self._client: Any = None
        self._session = SessionRef("", 0)
        self._phone: str | None = None
        self._paired = False
        self._codes = 0
        self._stopping = False
        self._ready: asyncio.Future[None] | None = None
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None

    # Engine.

    async def start_pairing(self, session: SessionRef) -> None:
        await self._connect(session, paired=False)

    async def restore(self, session: SessionRef, phone_number: str | None) -> None:
        if not await self._devices.holds_whatsmeow_device():
            raise EngineError(
                "NO_CREDENTIALS", "this session has no stored device; scan a new QR code"
            )
        self._phone = phone_number
        await self._connect(session, paired=True)

    async def pair_phone(self, session: SessionRef, phone_number: str) -> str:
        if self._client is None or self._paired or self._codes == 0:
            raise EngineError("NOT_PAIRING", "no pairing is under way for this session")
        client = self._client
        try:
            return str(await self._call(client.PairPhone, phone_number.removeprefix("+"), True))
        except Exception as error:
            raise EngineError("PAIR_PHONE_FAILED", str(error)) from error

    async def stop_pairing(self, session: SessionRef) -> None:
        await self.close()

    async def send(self, session: SessionRef, to: str, text: str) -> str:
        if self._client is None or not self._paired:
            raise EngineError("NOT_CONNECTED", "the device is not connected")
        from neonize.utils.jid import build_jid

        user, _, server = to.removeprefix("+").partition("@")
        jid = build_jid(user, server or "s.whatsapp.net")
        try:
            response = await self._call(self._client.send_message, jid, text)
        except Exception as error:
            # whatsmeow may fail after the message left (no server ack in time).
            raise EngineError("SEND_FAILED", str(error), definite=False) from error
        return str(response.ID)

    async def logout(self, session: SessionRef) -> None:
        client, self._stopping = self._client, True
        try:
            if client is not None:
                await self._call(client.logout)
        except Exception as error:  # the supervisor wipes the credentials anyway
            raise EngineError("LOGOUT_FAILED", str(error)) from error

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        """The supervisor keeps the credentials; a worker holds only its own."""

    def hold(self, instance_id: str, until: float, epoch: int) -> None:
        """The worker process holds the deadline (its ``LeaseSwitch``), not the engine."""

    def revoke(self, instance_id: str) -> None:
        """The supervisor revokes a session by killing its worker, not through the engine."""

    async def release(self, session: SessionRef) -> None:
        """The supervisor releases a session by stopping its worker; this closes the client."""
        await self.close()

    async def close(self) -> None:
        client, self._stopping = self._client, True
        if client is not None:
            with contextlib.suppress(Exception):
                await self._call(client.stop, within=5.0)

    # The connection.

    async def _call(
        self, function: Callable[..., Any], *args: Any, within: float = CALL_TIMEOUT
    ) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(function, *args), within)

    async def _connect(self, session: SessionRef, *, paired: bool) -> None:
        if self._client is not None:
            raise EngineError("ALREADY_STARTED", "this worker already holds a connection")
        from neonize import events as neonize_events
        from neonize.client import NewClient

        self._session, self._paired = session, paired
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        client = NewClient(self._devices.whatsmeow_database)

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

        client.event.qr(lambda _client, code: put("qr", code))
        for cls in {getattr(neonize_events, n + "Ev", None) for n in EVENT_NAMES} - {None}:
            client.event(cls)(lambda _client, event: put("event", event))
        self._client = client
        self._consumer = asyncio.create_task(self._consume())

        def run() -> None:
            try:
                client.connect()
            except Exception as error:  # noqa: BLE001 - reported to the loop
                put("ended", str(error) or type(error).__name__)
            else:
                put("ended", "")

        threading.Thread(target=run, name=f"whatsmeow-{session.instance_id}", daemon=True).start()
        await self._ready

    async def _consume(self) -> None:
        from google.protobuf.json_format import MessageToDict

        while True:
            kind, value = await self._queue.get()
            try:
                if kind == "qr":
                    await self._show_code(bytes(value).decode())
                elif kind == "event":
                    fields = MessageToDict(value, preserving_proto_field_name=True)
                    await self._on_event(value.DESCRIPTOR.name, fields)
                else:
                    await self._on_ended(value)
            except Exception:
                log.exception("could not report a whatsmeow %s", kind)

    async def _show_code(self, code: str) -> None:
        seconds = FIRST_CODE_SECONDS if self._codes == 0 else LATER_CODE_SECONDS
        self._codes += 1
        expires_at = self._clock.now() + timedelta(seconds=seconds)
        await self._report(self._session, states.QRShown(code, expires_at))
        self._settle()

    async def _on_event(self, name: str, fields: dict[str, Any]) -> None:
        if name == "Receipt":
            receipt = map_receipt(fields, self._clock.now())
            if receipt is not None:
                await self._report(self._session, receipt)
            return
        outcome = map_event(name, fields, paired=self._paired)
        if outcome is None or (self._stopping and outcome.report != "connected"):
            return
        log.info("whatsmeow %s: %s", name, outcome.code or outcome.report)
        report, session = self._report, self._session
        if outcome.report == "qr_scanned":
            self._paired = True
            await report(session, states.QRScanned())
        elif outcome.report == "connected":
            self._paired = True
            await report(session, states.Connected(await self._phone_number()))
            self._settle()
        elif outcome.report == "pairing_failed":
            await report(session, states.PairingFailed(outcome.code, outcome.message))
            self._settle(EngineError(outcome.code, outcome.message))
        elif outcome.report == "failed":
            await report(session, states.Failed(outcome.code, outcome.message))
            self._settle(EngineError(outcome.code, outcome.message))
        else:
            event = states.Disconnected(outcome.reason, outcome.message, outcome.code)
            await report(session, event)
            if outcome.reconnects:
                await report(session, states.Reconnecting())
            self._settle(EngineError(outcome.code, outcome.message))
        if outcome.ends is not None:
            self._stopping = True
            self._end(outcome.ends)

    async def _on_ended(self, error: str) -> None:
        if self._stopping:
            return
        if self._ready is not None and not self._ready.done():
            self._settle(EngineError("DIAL_FAILED", f"could not reach WhatsApp: {error}"))
            return  # the command that started the connection reports it
        self._stopping = True
        message = f"The connection to WhatsApp ended: {error or 'closed'}; reconnecting"
        if self._paired:
            event = states.Disconnected(NETWORK, message, "CONNECTION_LOST")
            await self._report(self._session, event)
        self._end(EXIT_RETRY if self._paired else EXIT_DONE)

    def _settle(self, error: EngineError | None = None) -> None:
        ready = self._ready
        if ready is None or ready.done():
            return
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(error)

    async def _phone_number(self) -> str:
        with contextlib.suppress(Exception):
            device = await self._call(self._client.get_me, within=5.0)
            if device.JID.User:
                self._phone = phone_from_jid_user(device.JID.User)
        return self._phone or "+0"
