"""Sending messages: the intent is recorded, the engine sends, the outcome is recorded.

A message is committed as ``pending`` before the engine sees it. Its outcome
(``sent``, ``failed``, or ``unknown`` when the engine cannot tell) is
committed after, forward only and by message id, whoever owns the session by
then; if that commit fails, the outcome is kept in memory, answered to repeats
of its idempotency key, and committed again until it lands. A message whose
outcome was never recorded (the service stopped while the engine had it) is
``unknown`` after a restart, never "not sent": WhatsApp may have it. A message
the engine provably never received (its intent's commit was in doubt, or the
service stopped before handing it over) is ``failed`` with ``NOT_SENT``: the
caller may send it again under a new idempotency key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from service.clock import Clock
from service.domain import errors, states
from service.domain.cell import SessionCell
from service.domain.contract import FAILED, PENDING, SENT, UNKNOWN_MESSAGE
from service.domain.registry import Registry
from service.engine.port import Engine, EngineError
from service.faults import FaultPoints
from service.store.failures import CommitUnknown
from service.store.messages import Message, request_digest
from service.store.port import Store
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

#: Seconds between attempts to record an outcome whose first commit failed.
RECORD_RETRY = 1.0
#: The error code of a message the engine provably never received.
NOT_SENT = "NOT_SENT"


@dataclass(frozen=True, slots=True)
class SendResult:
    message: Message
    replayed: bool


class Sending:
    """Send for every session, at most once per idempotency key."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        engine: Engine,
        clock: Clock,
        faults: FaultPoints,
        on_outcome: Callable[[Message], None] | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._engine = engine
        self._clock = clock
        self._faults = faults
        self._on_outcome = on_outcome or (lambda message: None)
        #: Outcomes known but not yet committed, by message id.
        self._unrecorded: dict[str, Message] = {}

    async def send(self, instance_id: str, to: str, text: str, key: str | None) -> SendResult:
        cell = await self._registry.settled(instance_id)
        digest = request_digest(to, text)
        if key is not None:
            earlier = await self._earlier(cell, key, digest)
            if earlier is not None:
                return _answer(dataclasses.replace(earlier, replayed=True), instance_id)
        states.check_can_send(cell.current)
        self._take_token(cell)
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        if key is not None:
            cell.sends[key] = (digest, future)
        self._registry.spawn(self._send(cell, to, text, key, digest, future))
        return _answer(await asyncio.shield(future), instance_id)

    async def _earlier(self, cell: SessionCell, key: str, digest: str) -> SendResult | None:
        """The result of an earlier call with ``key``, which must have asked the same."""
        running = cell.sends.get(key)
        if running is not None:
            _check_same_request(cell, key, running[0], digest)
            first: SendResult = await asyncio.shield(running[1])
            return first
        found = await self._store.find_message(cell.ref, key)
        if found is None:
            if key in cell.sends:  # a call with the key started while we looked
                return await self._earlier(cell, key, digest)
            return None
        _check_same_request(cell, key, found.request_digest, digest)
        return SendResult(self._unrecorded.get(found.id, found), replayed=True)

    def _take_token(self, cell: SessionCell) -> None:
        wait = cell.bucket.take(self._clock.now())
        if wait is not None:
            limits = cell.limits
            raise errors.limit_exceeded(
                "send_rate",
                f"session {cell.instance_id!r} sends faster than {limits.send_rate:g} "
                f"messages per second; retry in {wait:.2f} s",
                retry_after=wait,
                instance_id=cell.instance_id,
            )

    async def _send(
        self,
        cell: SessionCell,
        to: str,
        text: str,
        key: str | None,
        digest: str,
        future: asyncio.Future[SendResult],
    ) -> None:
        try:
            result = await self._intent_effect_outcome(cell, to, text, key, digest)
        except BaseException as error:  # noqa: BLE001 - every waiter gets the same answer
            future.set_exception(error)
            future.exception()  # marked retrieved: the waiters, if any, get it too
        else:
            future.set_result(result)
        finally:
            if key is not None and cell.sends.get(key, (None, None))[1] is future:
                del cell.sends[key]

    async def _intent_effect_outcome(
        self, cell: SessionCell, to: str, text: str, key: str | None, digest: str
    ) -> SendResult:
        session = cell.current
        message = Message(
            id=str(uuid.uuid4()),
            session_id=session.id,
            instance_id=session.instance_id,
            idempotency_key=key,
            request_digest=digest,
            recipient=to,
            text=text,
            status=PENDING,
            accepted_at=self._clock.now(),
        )
        await self._record_intent(message)
        self._faults.hit("send.after_intent")
        try:
            whatsapp_id = await self._engine.send(session.ref, to, text)
            message = dataclasses.replace(message, status=SENT, whatsapp_message_id=whatsapp_id)
        except EngineError as error:
            status = FAILED if error.definite else UNKNOWN_MESSAGE
            message = dataclasses.replace(
                message, status=status, error_code=error.code, error_message=error.message
            )
        self._faults.hit("send.after_effect")
        await self._record(message)
        self._on_outcome(message)
        return SendResult(message, replayed=False)

    async def _record_intent(self, message: Message) -> None:
        """Commit the intent: nothing is sent unrecorded.

        If this fails in a way that leaves the intent perhaps stored (its
        commit's answer lost, or the service stopping meanwhile), the engine
        never gets the message, so it is recorded as not sent once it can be.
        """
        try:
            await self._store.insert_message(message)
        except CommitUnknown:
            self._record_soon(_not_sent(message, "its record could not be confirmed"))
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self._record(_not_sent(message, "the service was stopping")))
            raise

    async def _record(self, message: Message) -> None:
        """Commit the outcome; if that fails, keep it and commit it again until it lands."""
        try:
            await self._store.finish_message(message, self._clock.now())
        except Exception as error:  # noqa: BLE001 - the outcome is known: it must not be lost
            log.error("could not record the outcome of message %s: %s", message.id, error)
            self._record_soon(message)

    def _record_soon(self, message: Message) -> None:
        """Commit an outcome in the background, as often as it takes."""
        self._unrecorded[message.id] = message
        self._registry.spawn(self._record_later(message))

    async def _record_later(self, message: Message) -> None:
        while self._unrecorded.get(message.id) is message:
            await asyncio.sleep(RECORD_RETRY)
            try:
                await self._store.finish_message(message, self._clock.now())
            except Exception as error:  # noqa: BLE001 - tried again after a pause
                log.warning("still cannot record message %s: %s", message.id, error)
            else:
                del self._unrecorded[message.id]
                log.info("recorded the outcome of message %s", message.id)


def _not_sent(message: Message, why: str) -> Message:
    """The outcome of a message the engine never received."""
    return dataclasses.replace(
        message,
        status=FAILED,
        error_code=NOT_SENT,
        error_message=f"not sent: {why}; send it again under a new idempotency key",
    )


def _check_same_request(cell: SessionCell, key: str, first: str, digest: str) -> None:
    if first and first != digest:
        raise errors.ContractError(
            session_pb2.ERROR_REASON_INVALID_ARGUMENT,
            f"idempotency_key {key!r} was already used for a different message "
            f"(another recipient or text) on session {cell.instance_id!r}; "
            "use a new key for a new message",
            field="idempotency_key",
            instance_id=cell.instance_id,
        )


def _answer(result: SendResult, instance_id: str) -> SendResult:
    """The result, or the error that says what became of the message."""
    message = result.message
    replayed = str(result.replayed).lower()
    if message.status == FAILED:
        raise errors.ContractError(
            session_pb2.ERROR_REASON_WHATSAPP_ERROR,
            f"WhatsApp did not accept the message: {message.error_message}",
            instance_id=instance_id,
            message_id=message.id,
            engine_code=message.error_code or "",
            replayed=replayed,
        )
    if message.status in (UNKNOWN_MESSAGE, PENDING):
        raise errors.ContractError(
            session_pb2.ERROR_REASON_MESSAGE_OUTCOME_UNKNOWN,
            f"the message was handed to WhatsApp but its outcome is not known "
            f"({message.error_message or 'no answer yet'}); it is not sent again by itself",
            instance_id=instance_id,
            message_id=message.id,
            engine_code=message.error_code or "",
            replayed=replayed,
        )
    return result
