"""The Session Manager's domain: sessions, their QR pairing and their messages.

Data flows one way: an RPC or an engine report becomes an event; the state
machine (``states``) computes the next state; the store commits it; only then
the in-memory view is updated and watchers are told. Commits of one session
are serialized; a commit, once started, finishes even if its caller goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from service.api.metrics import Metrics, count_statuses
from service.clock import Clock
from service.domain import errors, states
from service.domain.contract import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    ERROR,
    FAILED,
    INIT,
    LOGOUT,
    PENDING,
    QR_GENERATED,
    SENT,
    DisconnectReason,
    Status,
    qr_status_text,
    status_text,
)
from service.domain.limits import Limits, SendRate
from service.domain.qr import render_data_url
from service.domain.states import Session
from service.domain.watch import WatchClosed, Watcher, WatchHub
from service.engine.port import Engine, EngineError
from service.store.sqlite import Message, Store
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QR_TIMEOUT = 30.0
DISCONNECT_BY_REQUEST = "Disconnected by request; scan a new QR code to connect"


@dataclass(frozen=True, slots=True)
class SendResult:
    message: Message
    replayed: bool


def _whatsapp_error(message: Message, instance_id: str, replayed: bool) -> errors.ContractError:
    return errors.ContractError(
        session_pb2.ERROR_REASON_WHATSAPP_ERROR,
        f"WhatsApp did not accept the message: {message.error_message}",
        instance_id=instance_id,
        message_id=message.id,
        engine_code=message.error_code or "",
        replayed=str(replayed).lower(),
    )


class SessionManager:
    """Owns every session; implements ``EngineEvents`` for its engine."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        clock: Clock,
        *,
        qr_timeout: float = DEFAULT_QR_TIMEOUT,
        watch_buffer: int = 16,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._qr_timeout = qr_timeout
        self.hub: WatchHub[Session] = WatchHub(watch_buffer)
        self._limits = limits or Limits()
        self._metrics = metrics
        self._send_rate = SendRate(self._limits.send_rate, self._limits.send_burst)
        self._sessions: dict[str, Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pairings: dict[str, asyncio.Future[Session]] = {}
        self._expiries: dict[str, asyncio.Task[None]] = {}
        self._sends: dict[tuple[str, str], asyncio.Future[SendResult]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        engine.bind(self)

    # Life cycle.

    async def start(self) -> None:
        """Load every session; re-arm QR expiries; hand paired sessions to the engine."""
        for session in await self._store.load_sessions():
            self._sessions[session.instance_id] = session
        now = self._clock.now()
        interrupted = await self._store.fail_pending_messages(
            "INTERRUPTED", "The service stopped before WhatsApp answered for this message", now
        )
        if interrupted:
            log.warning("%d messages were interrupted by the last stop", interrupted)
        for session in list(self._sessions.values()):
            if session.qr_status == QR_GENERATED and session.qr_expires_at is not None:
                if self._engine.resumes_pairing:
                    self._arm_expiry(session.instance_id, session.qr_expires_at)
                else:
                    await self._apply(session.instance_id, states.QRExpired(session.qr_expires_at))
            elif self._was_paired(session):
                self._spawn(self._restore(session))
        log.info("loaded %d sessions", len(self._sessions))

    @staticmethod
    def _was_paired(session: Session) -> bool:
        if session.status in (CONNECTED, CONNECTING):
            return True
        return session.status == DISCONNECTED and not states.is_logged_out(session)

    async def _restore(self, session: Session) -> None:
        try:
            await self._apply(session.instance_id, states.Reconnecting())
            await self._engine.restore(session.instance_id, session.phone_number)
        except (errors.ContractError, EngineError) as error:
            log.warning("restoring %s failed: %s", session.instance_id, error)

    def close_watches(self) -> None:
        """End every watch stream: the server is shutting down."""
        self.hub.close_all(WatchClosed("the Session Manager is shutting down"))

    async def close(self) -> None:
        """End every watch, stop timers and the engine; the store is closed by its owner."""
        self.close_watches()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._engine.close()

    # Reads.

    def get(self, instance_id: str) -> Session:
        session = self._sessions.get(instance_id)
        if session is None:
            raise errors.session_not_found(instance_id)
        return session

    async def list(
        self, page_size: int, after: str, status: Status | None
    ) -> tuple[list[Session], str | None]:
        """One page ordered by instance_id, and the last instance_id if more may follow."""
        page = await self._store.list_sessions(after, page_size + 1, status)
        if len(page) > page_size:
            return page[:page_size], page[page_size - 1].instance_id
        return page, None

    def status_counts(self) -> dict[str, int]:
        return count_statuses(status_text(s.status) for s in list(self._sessions.values()))

    def watcher_count(self) -> int:
        return self.hub.count()

    def watch(self, instance_id: str) -> Watcher[Session]:
        """A watcher that yields the current state first, then every committed change."""
        session = self.get(instance_id)
        if self.hub.count(instance_id) >= self._limits.watchers_per_session:
            raise errors.limit_exceeded(
                "watchers_per_session",
                f"session {instance_id!r} already has "
                f"{self._limits.watchers_per_session} open watchers",
                retry_after=1.0,
                instance_id=instance_id,
            )
        if self.hub.count() >= self._limits.watchers_total:
            raise errors.limit_exceeded(
                "watchers_total",
                f"the server already has {self._limits.watchers_total} open watchers",
                retry_after=1.0,
                instance_id=instance_id,
            )
        return self.hub.subscribe(instance_id, session)

    def unwatch(self, instance_id: str, watcher: Watcher[Session]) -> None:
        self.hub.unsubscribe(instance_id, watcher)

    # Administration.

    async def create(self, instance_id: str) -> Session:
        return await self._shielded(self._create(instance_id))

    async def _create(self, instance_id: str) -> Session:
        async with self._lock(instance_id):
            if instance_id in self._sessions:
                raise errors.ContractError(
                    session_pb2.ERROR_REASON_SESSION_ALREADY_EXISTS,
                    f"session {instance_id!r} already exists",
                    instance_id=instance_id,
                )
            session = states.new_session(instance_id, self._clock.now())
            try:
                row_id = await self._store.insert_session(session)
            except sqlite3.IntegrityError as error:
                raise errors.internal(
                    f"could not store session {instance_id!r}: {error}"
                ) from error
            session = dataclasses.replace(session, id=row_id)
            self._sessions[instance_id] = session
            log.info("created", extra={"instance_id": instance_id})
            return session

    async def delete(self, instance_id: str) -> None:
        session = self.get(instance_id)
        await self._engine_logout(instance_id)
        await self._shielded(self._delete(session))

    async def _delete(self, session: Session) -> None:
        instance_id = session.instance_id
        async with self._lock(instance_id):
            self.get(instance_id)
            await self._store.delete_session(session.id)
            del self._sessions[instance_id]
            self._cancel_expiry(instance_id)
            pairing = self._pairings.pop(instance_id, None)
            if pairing is not None and not pairing.done():
                pairing.set_exception(errors.session_not_found(instance_id))
            self.hub.close(
                instance_id, WatchClosed(f"session {instance_id!r} was deleted", deleted=True)
            )
        self._locks.pop(instance_id, None)
        self._send_rate.forget(instance_id)
        log.info("deleted", extra={"instance_id": instance_id})

    # Public operations.

    async def request_qr(self, instance_id: str) -> Session:
        session = self.get(instance_id)
        if states.check_qr_request(session, self._clock.now()):
            return session
        pairing = self._pairings.get(instance_id)
        if pairing is None:
            pairing = asyncio.get_running_loop().create_future()
            self._pairings[instance_id] = pairing
            self._spawn(self._start_pairing(instance_id, pairing))
        try:
            session = await asyncio.wait_for(asyncio.shield(pairing), self._qr_timeout)
        except TimeoutError:
            if self._pairings.get(instance_id) is pairing:
                del self._pairings[instance_id]
                self._spawn(self._engine.stop_pairing(instance_id))
            raise errors.ContractError(
                session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
                f"the engine showed no QR code for {instance_id!r} within {self._qr_timeout:g} s",
                instance_id=instance_id,
            ) from None
        if states.check_qr_request(session, self._clock.now()):
            return session
        raise errors.ContractError(
            session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
            f"pairing of {instance_id!r} ended without a QR code: "
            + (session.last_error_message or "the session changed meanwhile"),
            instance_id=instance_id,
            status=status_text(session.status),
        )

    async def _start_pairing(self, instance_id: str, pairing: asyncio.Future[Session]) -> None:
        try:
            await self._engine.start_pairing(instance_id)
        except EngineError as error:
            with contextlib.suppress(errors.ContractError):  # deleted or connected meanwhile
                await self.pairing_failed(instance_id, error.code, error.message)
            if self._pairings.get(instance_id) is pairing:
                del self._pairings[instance_id]
            if not pairing.done():
                pairing.set_exception(
                    errors.ContractError(
                        session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
                        f"the engine could not start pairing {instance_id!r}: {error.message}",
                        instance_id=instance_id,
                        engine_code=error.code,
                    )
                )

    async def pair_phone(self, instance_id: str, phone_number: str) -> tuple[str, Session]:
        """WhatsApp's linking code for ``phone_number``, starting a pairing if none is under way."""
        await self.request_qr(instance_id)
        try:
            code = await self._engine.pair_phone(instance_id, phone_number)
        except EngineError as error:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_WHATSAPP_ERROR,
                f"WhatsApp gave no linking code for {instance_id!r}: {error.message}",
                instance_id=instance_id,
                engine_code=error.code,
            ) from error
        log.info("linking code issued", extra={"instance_id": instance_id})
        return code, self.get(instance_id)

    async def disconnect(self, instance_id: str) -> Session:
        session = self.get(instance_id)
        if session.status == INIT:
            raise errors.in_status(
                session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED,
                f"session {instance_id!r} was never connected",
                instance_id,
                session.status,
            )
        if states.is_logged_out(session):
            return session
        await self._engine_logout(instance_id)
        return await self._apply(instance_id, states.Disconnected(LOGOUT, DISCONNECT_BY_REQUEST))

    async def _engine_logout(self, instance_id: str) -> None:
        try:
            await self._engine.logout(instance_id)
        except EngineError as error:
            log.warning(
                "the engine could not log out: %s; its credentials are dropped anyway",
                error.message,
                extra={"instance_id": instance_id},
            )

    async def send(
        self, instance_id: str, to: str, text: str, idempotency_key: str | None
    ) -> SendResult:
        session = self.get(instance_id)
        if idempotency_key is None:
            states.check_can_send(session)
            self._take_send_token(instance_id)
            return await self._shielded(self._send(session, to, text, None))
        key = (instance_id, idempotency_key)
        running = self._sends.get(key)
        if running is not None:
            first = await asyncio.shield(running)
            return self._replay(dataclasses.replace(first, replayed=True), instance_id)
        found = await self._store.find_message(session.id, idempotency_key)
        if found is not None:
            return self._replay(SendResult(found, replayed=True), instance_id)
        states.check_can_send(self.get(instance_id))
        if key in self._sends:  # another call with the key started meanwhile
            return await self.send(instance_id, to, text, idempotency_key)
        self._take_send_token(instance_id)
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._sends[key] = future
        return await self._shielded(self._send_keyed(key, future, session, to, text))

    async def _send_keyed(
        self,
        key: tuple[str, str],
        future: asyncio.Future[SendResult],
        session: Session,
        to: str,
        text: str,
    ) -> SendResult:
        """Send once for an idempotency key; calls with the same key meanwhile share the result."""
        try:
            result = await self._send(session, to, text, key[1])
        except Exception as error:
            future.set_exception(error)
            future.exception()  # marked retrieved: the waiters, if any, get it too
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._sends[key]

    def _take_send_token(self, instance_id: str) -> None:
        wait = self._send_rate.take(instance_id, self._clock.now())
        if wait is not None:
            raise errors.limit_exceeded(
                "send_rate",
                f"session {instance_id!r} sends faster than {self._limits.send_rate:g} "
                f"messages per second; retry in {wait:.2f} s",
                retry_after=wait,
                instance_id=instance_id,
            )

    def _replay(self, result: SendResult, instance_id: str) -> SendResult:
        if result.message.status == FAILED:
            raise _whatsapp_error(result.message, instance_id, replayed=True)
        return result

    async def _send(
        self, session: Session, to: str, text: str, idempotency_key: str | None
    ) -> SendResult:
        message = Message(
            id=str(uuid.uuid4()),
            session_id=session.id,
            idempotency_key=idempotency_key,
            recipient=to,
            text=text,
            status=PENDING,
            accepted_at=self._clock.now(),
        )
        await self._store.insert_message(message)
        try:
            whatsapp_id = await self._engine.send(session.instance_id, to, text)
            message = dataclasses.replace(message, status=SENT, whatsapp_message_id=whatsapp_id)
        except EngineError as error:
            message = dataclasses.replace(
                message, status=FAILED, error_code=error.code, error_message=error.message
            )
        await self._store.finish_message(message, self._clock.now())
        if self._metrics is not None:
            self._metrics.messages.labels("sent" if message.status == SENT else "failed").inc()
        if message.status == FAILED:
            raise _whatsapp_error(message, session.instance_id, replayed=False)
        return SendResult(message, replayed=False)

    # Engine reports (EngineEvents).

    async def qr_code(self, instance_id: str, code: str, expires_at: datetime) -> Session:
        if expires_at <= self._clock.now():
            raise errors.invalid_argument(
                "expires_at", "expires_at must be in the future", instance_id
            )
        self.get(instance_id)
        qr_string = render_data_url(code)
        return await self._apply(instance_id, states.QRShown(qr_string, expires_at))

    async def qr_scanned(self, instance_id: str) -> Session:
        return await self._apply(instance_id, states.QRScanned())

    async def reconnecting(self, instance_id: str) -> Session:
        return await self._apply(instance_id, states.Reconnecting())

    async def connected(self, instance_id: str, phone_number: str) -> Session:
        return await self._apply(instance_id, states.Connected(phone_number))

    async def disconnected(
        self,
        instance_id: str,
        reason: DisconnectReason,
        message: str = "",
        code: str | None = None,
    ) -> Session:
        return await self._apply(instance_id, states.Disconnected(reason, message, code))

    async def failed(self, instance_id: str, code: str, message: str) -> Session:
        return await self._apply(instance_id, states.Failed(code, message))

    async def pairing_failed(self, instance_id: str, code: str, message: str) -> Session:
        return await self._apply(instance_id, states.PairingFailed(code, message))

    # Commits.

    async def _apply(self, instance_id: str, event: states.Event) -> Session:
        """Commit the event's transition; returns the session as committed."""
        return await self._shielded(self._commit(instance_id, event))

    async def _commit(self, instance_id: str, event: states.Event) -> Session:
        async with self._lock(instance_id):
            current = self.get(instance_id)
            updated = states.apply(current, event, self._clock.now())
            if updated is None:
                return current
            await self._store.update_session(updated)
            self._sessions[instance_id] = updated
            self._after_commit(updated, event)
            return updated

    def _after_commit(self, session: Session, event: states.Event) -> None:
        instance_id = session.instance_id
        self.hub.publish(instance_id, session)
        if session.qr_status == QR_GENERATED:
            if isinstance(event, states.QRShown):
                self._arm_expiry(instance_id, event.expires_at)
                if self._metrics is not None:
                    self._metrics.qr_codes.inc()
        else:
            self._cancel_expiry(instance_id)
        if not isinstance(event, states.QRExpired | states.PairingFailed):
            pairing = self._pairings.pop(instance_id, None)
            if pairing is not None and not pairing.done():
                pairing.set_result(session)
        log.info(
            "%s -> %s / %s (revision %d)",
            type(event).__name__,
            status_text(session.status),
            qr_status_text(session.qr_status),
            session.revision,
            extra={"instance_id": instance_id},
        )
        if session.status == ERROR:
            log.warning(
                "error %s: %s",
                session.last_error_code,
                session.last_error_message,
                extra={"instance_id": instance_id},
            )

    def _arm_expiry(self, instance_id: str, expires_at: datetime) -> None:
        self._cancel_expiry(instance_id)
        self._expiries[instance_id] = self._spawn(self._expire(instance_id, expires_at))

    def _cancel_expiry(self, instance_id: str) -> None:
        task = self._expiries.pop(instance_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _expire(self, instance_id: str, expires_at: datetime) -> None:
        await self._clock.sleep_until(expires_at)
        if self._expiries.get(instance_id) is asyncio.current_task():
            del self._expiries[instance_id]
        with contextlib.suppress(errors.ContractError):  # the session was deleted meanwhile
            await self._apply(instance_id, states.QRExpired(expires_at))

    # Plumbing.

    def _lock(self, instance_id: str) -> asyncio.Lock:
        lock = self._locks.get(instance_id)
        if lock is None:
            lock = self._locks[instance_id] = asyncio.Lock()
        return lock

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, errors.ContractError):
            log.error("background task failed", exc_info=error)

    async def _shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to the end even if the caller is cancelled, so no commit is half done."""
        return await asyncio.shield(self._spawn(coroutine))
