"""The Session Manager's domain as the transports see it: one object, one call per operation.

Data flows one way: a request or an engine report becomes an event; the state
machine decides; the store commits; only then do effects happen (a device
logged out, credentials wiped, a message handed to WhatsApp) and watchers hear
of it. A commit that fails leaves the world as it was; a crash between a
commit and its effect is completed at the next start (``start``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from service.clock import Clock
from service.domain import errors, states
from service.domain.cell import Effect, SessionCell
from service.domain.contract import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    LOGOUT,
    QR_GENERATED,
    Status,
    status_text,
)
from service.domain.event_stream import EventStream, EventStreams, Opened
from service.domain.events import EventFilter
from service.domain.limits import Limits, check_watchers
from service.domain.pairing import Pairing
from service.domain.receipts import MessageReceipt
from service.domain.registry import Registry
from service.domain.sending import Sending, SendResult
from service.domain.states import EngineEvent, Session, SessionEvent, SessionRef
from service.domain.watch import WatchClosed, Watcher, WatchHub
from service.engine.port import EngineError, EngineFactory
from service.faults import FaultPoints
from service.store.messages import Message
from service.store.port import Store
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)


class DomainMetrics(Protocol):
    """What the domain counts: QR codes issued and message outcomes."""

    def on_qr_code(self) -> None: ...

    def on_message(self, message: Message) -> None: ...


DEFAULT_QR_TIMEOUT = 30.0
#: How long a session handed to another node waits for its sends under way.
RELEASE_SEND_WAIT = 5.0
DISCONNECT_BY_REQUEST = "Disconnected by request; scan a new QR code to connect"
OUTCOME_UNKNOWN = (
    "OUTCOME_UNKNOWN",
    "The service stopped before the outcome of this message was recorded; "
    "WhatsApp may have accepted it",
)

__all__ = ["SendResult", "SessionManager"]


class SessionManager:
    """Every session: reads, administration, pairing, sending, and the engine's reports."""

    def __init__(
        self,
        store: Store,
        engine: EngineFactory,
        clock: Clock,
        *,
        qr_timeout: float = DEFAULT_QR_TIMEOUT,
        watch_buffer: int = 16,
        limits: Limits | None = None,
        metrics: DomainMetrics | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits or Limits()
        self._faults: FaultPoints = store.faults
        self.hub: WatchHub[Session] = WatchHub(watch_buffer)
        self._registry = Registry(store, clock, self.hub, self._limits)
        self.engine = engine(self.report)
        self._pairing = Pairing(self._registry, self.engine, clock, qr_timeout)
        self._metrics = metrics
        on_message = metrics.on_message if metrics is not None else None
        self._sending = Sending(self._registry, store, self.engine, clock, self._faults, on_message)
        self._registry.on_commit(self._after_commit)
        #: The list-wide streams of the event log, fed by the store's commits.
        self.events = EventStreams(store, self._limits)
        store.on_events(self.events.appended)

    # Life cycle.

    async def start(self) -> None:
        """Load every session and finish what a crash interrupted (one node).

        Messages whose outcome was never recorded become unknown; credentials
        of sessions deleted or logged out are forgotten; codes are expired or
        kept; paired sessions reconnect.
        """
        await self._registry.load()
        await self.events.start()  # before the first change appended from here on
        code, message = OUTCOME_UNKNOWN
        unknown = await self._store.mark_pending_unknown(code, message, self._clock.now())
        if unknown:
            log.warning("%d messages have an unknown outcome after the last stop", unknown)
        sessions = list(self._registry.sessions())
        await self.engine.forget_all_but({s.ref for s in sessions if _was_paired(s)})
        for session in sessions:
            await self._resume(self._registry.cell(session.instance_id), session)
        log.info("loaded %d sessions", len(sessions))

    async def start_as_node(self) -> None:
        """Start empty, as one of several nodes: sessions come as their leases are taken.

        Credentials of deleted sessions are forgotten (what a crash between a
        deletion and its effect left behind, on any node).
        """
        await self.events.start()
        await self.engine.forget_all_but(set())

    async def _resume(self, cell: SessionCell, session: Session) -> None:
        """Carry on with a session just loaded: expire or keep its code, reconnect it if paired.

        A code stays valid only with an engine that can resume its pairing
        anywhere; a worker's code died with its worker (here or on another node).
        """
        if session.qr_status == QR_GENERATED and session.qr_expires_at is not None:
            if self.engine.resumes_pairing:
                self._pairing.expire_later(cell, session.qr_expires_at)
            else:  # the worker that showed it is gone: the code can no longer be scanned
                await self._registry.apply(cell, states.QRExpired(session.qr_expires_at))
        elif _was_paired(session):
            self._registry.spawn(self._restore(cell, session))

    # Several nodes: sessions come and go as their leases do.

    def holds(self, instance_id: str) -> bool:
        """Whether this node holds the session now."""
        return self._registry.holds(instance_id)

    async def adopt(self, session: Session) -> None:
        """Take over a session (its lease was just taken) and finish what its last owner left.

        Its messages without an outcome become unknown, a pairing under way on
        the old owner shows its code as expired, and a paired device reconnects
        from its stored credentials.
        """
        cell = self._registry.adopt(session)
        cell.arrival = asyncio.Event()
        try:
            code, message = OUTCOME_UNKNOWN
            await self._store.mark_pending_unknown(code, message, self._clock.now(), session.ref)
            if _was_paired(session):
                if await self._reconnecting(cell) and cell.live:
                    self._registry.spawn(self._reconnect(session))
            else:
                await self._resume(cell, session)
        finally:
            cell.arrival.set()

    async def release(self, instance_id: str) -> None:
        """Stop holding a session: its connection stops, its credentials stay for the next owner.

        Nothing is written: the session is either handed over (the caller then
        releases the lease) or already another node's.
        """
        cell = await self._registry.drop(instance_id)
        if cell is None or cell.session is None:
            return
        sends = [future for _, future in cell.sends.values()]
        await self.engine.release(cell.session.ref)
        if sends:  # their outcomes are recorded (or left unknown) before the lease goes
            await asyncio.wait(sends, timeout=RELEASE_SEND_WAIT)

    async def _restore(self, cell: SessionCell, session: Session) -> None:
        if await self._reconnecting(cell) and cell.live:  # else its next owner reconnects it
            await self._reconnect(session)

    async def _reconnecting(self, cell: SessionCell) -> bool:
        """Commit that the session reconnects; whether it was."""
        try:
            await self._registry.apply(cell, states.Reconnecting())
        except errors.ContractError as error:
            log.warning("restoring %s failed: %s", cell.instance_id, error)
            return False
        return True

    async def _reconnect(self, session: Session) -> None:
        try:
            await self.engine.restore(session.ref, session.phone_number)
        except (errors.ContractError, EngineError) as error:
            log.warning("restoring %s failed: %s", session.instance_id, error)

    def close_watches(self) -> None:
        """End every watch stream, per session and list-wide: the server is shutting down."""
        closing = WatchClosed("the Session Manager is shutting down")
        self.hub.close_all(closing)
        self.events.close_all(closing)

    async def close(self) -> None:
        """End every watch, stop timers and the engine; the store is closed by its owner."""
        self.close_watches()
        await self.events.stop()
        await self._registry.close()
        await self.engine.close()

    # Reads.

    async def get(self, instance_id: str) -> Session:
        return (await self._registry.settled(instance_id)).current

    async def ref(self, instance_id: str) -> SessionRef:
        """The current incarnation of ``instance_id``."""
        return self._registry.get(instance_id).ref

    async def list(
        self, page_size: int, after: str, status: Status | None
    ) -> tuple[list[Session], str | None]:
        return await self._registry.list(page_size, after, status)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in self._registry.sessions():
            text = status_text(session.status)
            counts[text] = counts.get(text, 0) + 1
        return counts

    def watcher_count(self) -> int:
        """Open watch streams: of one session, and of the event log."""
        return self.hub.count() + self.events.count()

    async def watch(self, instance_id: str) -> Watcher[Session]:
        """A watcher that yields the current state first, then every committed change."""
        session = self._registry.get(instance_id)
        check_watchers(self._limits, self.hub.count(instance_id), self.hub.count(), instance_id)
        return self.hub.subscribe(instance_id, session)

    def unwatch(self, instance_id: str, watcher: Watcher[Session]) -> None:
        self.hub.unsubscribe(instance_id, watcher)

    async def watch_events(self, selected: EventFilter, after: int | None) -> Opened:
        """A list-wide stream: the current state (or every event after ``after``), then
        every event that matches ``selected``."""
        return await self.events.open(selected, after)

    def unwatch_events(self, stream: EventStream) -> None:
        self.events.close(stream)

    async def get_message(self, instance_id: str, message_id: str) -> Message:
        """A message the session sent, as it stands; MESSAGE_NOT_FOUND if it sent none."""
        await self.get(instance_id)
        message = await self._sending.get(instance_id, message_id)
        if message is None:
            raise errors.message_not_found(instance_id, message_id)
        return message

    # Administration.

    async def create(self, instance_id: str) -> Session:
        return await self._registry.create(instance_id)

    async def delete(self, instance_id: str) -> None:
        """Commit the deletion, then log the device out and forget its credentials."""
        await self._registry.delete(instance_id, effect=self._logout_after("delete.after_commit"))

    # Public operations.

    async def request_qr(self, instance_id: str) -> Session:
        return await self._pairing.request_qr(instance_id)

    async def pair_phone(self, instance_id: str, phone_number: str) -> tuple[str, Session]:
        return await self._pairing.pair_phone(instance_id, phone_number)

    async def send(
        self, instance_id: str, to: str, text: str, idempotency_key: str | None
    ) -> SendResult:
        return await self._sending.send(instance_id, to, text, idempotency_key)

    async def disconnect(self, instance_id: str) -> Session:
        """Commit the logout, then unlink the device and forget its credentials."""
        cell = await self._registry.settled(instance_id)
        return await self._registry.apply(
            cell,
            states.Disconnected(LOGOUT, DISCONNECT_BY_REQUEST),
            effect=self._logout_after("disconnect.after_commit"),
        )

    def _logout_after(self, fault_point: str) -> Effect:
        """The effect of a committed logout or deletion: unlink the device, drop its credentials."""

        async def logout(session: Session) -> None:
            self._faults.hit(fault_point)
            await self._logout(session.ref)

        return logout

    async def _logout(self, session: SessionRef) -> None:
        try:
            await self.engine.logout(session)
        except EngineError as error:
            log.warning(
                "the engine could not log out: %s; its credentials are dropped anyway",
                error.message,
                extra={"instance_id": session.instance_id},
            )

    # The engine's reports.

    async def report(self, session: SessionRef, event: EngineEvent) -> object:
        """Commit what the engine reports about one incarnation: the session's committed
        state, or the messages a receipt moved.

        A report about a deleted incarnation is refused (SESSION_NOT_FOUND).
        """
        if isinstance(event, MessageReceipt):
            self._registry.cell_of(session)
            return await self._sending.receipt(session, event)
        return await self._report_session(session, event)

    async def _report_session(self, session: SessionRef, event: SessionEvent) -> Session:
        """Commit a session event; returns the committed state.

        After a logout, what would bring the old connection back is refused
        until a new pairing starts: it can only come from the connection that
        was unlinked.
        """
        cell = self._registry.cell_of(session)
        check = _refuse_revival if _from_old_connection(event) else None
        return await self._registry.apply(cell, event, check=check)

    async def report_current(self, instance_id: str, event: SessionEvent) -> Session:
        """Commit a report of the engine side's internal API about the current incarnation."""
        return await self._report_session(await self.ref(instance_id), event)

    def _after_commit(self, cell: SessionCell, session: Session, event: states.Event) -> None:
        if isinstance(event, states.Disconnected) and event.reason == LOGOUT:
            cell.unlinked = True  # whatever the old connection still says is stale
        if isinstance(event, states.QRShown) and self._metrics is not None:
            self._metrics.on_qr_code()


#: Reports that would bring a connection back (or show its pairing code).
_REVIVALS = (states.QRShown, states.QRScanned, states.Reconnecting, states.Connected)


def _from_old_connection(event: SessionEvent) -> bool:
    """Whether, after a logout, the event can only come from the connection that was unlinked:
    one that would bring it back, or a network drop of it (a logout needs no second one)."""
    if isinstance(event, states.Disconnected):
        return event.reason != LOGOUT
    return isinstance(event, _REVIVALS)


def _refuse_revival(cell: SessionCell) -> None:
    if cell.unlinked:
        raise errors.in_status(
            session_pb2.ERROR_REASON_INVALID_TRANSITION,
            f"session {cell.instance_id!r} was logged out; "
            "its old connection cannot come back: a new pairing is needed",
            cell.instance_id,
            cell.current.status,
        )


def _was_paired(session: Session) -> bool:
    if session.status in (CONNECTED, CONNECTING):
        return True
    return session.status == DISCONNECTED and not states.is_logged_out(session)
