"""QR pairing: starting it, answering RequestQR and PairPhone, and expiring codes.

RequestQR asks the engine to start pairing (once, however many calls ask at
the same time) and answers from what was committed: the engine reports its
first code before ``start_pairing`` returns, so the committed session then
shows it, or shows why it could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from service.clock import Clock
from service.domain import errors, states
from service.domain.cell import SessionCell
from service.domain.contract import QR_GENERATED, status_text
from service.domain.registry import Registry
from service.domain.states import Session
from service.engine.port import Engine, EngineError
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)


def _not_started(instance_id: str, error: EngineError) -> errors.ContractError | None:
    """The retryable refusal of an engine failure that left the session as it was.

    The worker never started: the credentials database is out of reach, or the
    session is no longer this node's. Other failures are the pairing's own.
    """
    if error.code == "CREDENTIALS_FENCED":
        return errors.session_moving(instance_id, f"is held by another node ({error.message})")
    if error.code == "CREDENTIALS_UNAVAILABLE":
        return errors.ContractError(
            session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE,
            f"the database is unavailable: pairing of {instance_id!r} could not start "
            f"({error.message}); nothing was stored",
            instance_id=instance_id,
            cause="unreachable",
            commit="none",
        )
    return None


class Pairing:
    """Pairing for every session: codes shown, expired, and linking codes."""

    def __init__(self, registry: Registry, engine: Engine, clock: Clock, qr_timeout: float):
        self._registry = registry
        self._engine = engine
        self._clock = clock
        self._qr_timeout = qr_timeout
        registry.on_commit(self._after_commit)

    async def request_qr(self, instance_id: str) -> Session:
        cell = await self._registry.settled(instance_id)
        if states.check_qr_request(cell.current, self._clock.now()):
            return cell.current
        if cell.pairing is None or cell.pairing.done():
            cell.pairing = self._registry.spawn(self._start(cell))
        try:
            await asyncio.wait_for(asyncio.shield(cell.pairing), self._qr_timeout)
        except TimeoutError:
            self._registry.spawn(self._engine.stop_pairing(cell.ref))
            raise errors.ContractError(
                session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
                f"the engine showed no QR code for {instance_id!r} within {self._qr_timeout:g} s",
                instance_id=instance_id,
            ) from None
        session = cell.current
        if states.check_qr_request(session, self._clock.now()):
            return session
        raise errors.ContractError(
            session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
            f"pairing of {instance_id!r} ended without a QR code: "
            + (session.last_error_message or "the session changed meanwhile"),
            instance_id=instance_id,
            status=status_text(session.status),
        )

    async def _start(self, cell: SessionCell) -> None:
        """Start the engine's pairing; its codes are committed as they come."""
        ref = cell.ref
        cell.unlinked = False
        try:
            await self._engine.start_pairing(ref)
        except EngineError as error:
            refusal = _not_started(ref.instance_id, error)
            if refusal is not None:
                raise refusal from None
            with contextlib.suppress(errors.ContractError):  # deleted or connected meanwhile
                await self._registry.apply(cell, states.PairingFailed(error.code, error.message))
            raise errors.ContractError(
                session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
                f"the engine could not start pairing {ref.instance_id!r}: {error.message}",
                instance_id=ref.instance_id,
                engine_code=error.code,
            ) from None

    async def pair_phone(self, instance_id: str, phone_number: str) -> tuple[str, Session]:
        """WhatsApp's linking code for ``phone_number``, starting a pairing if none is under way."""
        session = await self.request_qr(instance_id)
        try:
            code = await self._engine.pair_phone(session.ref, phone_number)
        except EngineError as error:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_WHATSAPP_ERROR,
                f"WhatsApp gave no linking code for {instance_id!r}: {error.message}",
                instance_id=instance_id,
                engine_code=error.code,
            ) from error
        log.info("linking code issued", extra={"instance_id": instance_id})
        return code, self._registry.get(instance_id)

    def expire_later(self, cell: SessionCell, expires_at: datetime) -> None:
        """Mark the shown code expired at ``expires_at`` (watchers are told at that moment)."""
        cell.stop_timer()
        cell.expiry = self._registry.spawn(self._expire(cell, expires_at))

    async def _expire(self, cell: SessionCell, expires_at: datetime) -> None:
        await self._clock.sleep_until(expires_at)
        if cell.expiry is asyncio.current_task():
            cell.expiry = None
        with contextlib.suppress(errors.ContractError):  # the session was deleted meanwhile
            await self._registry.apply(cell, states.QRExpired(expires_at))

    def _after_commit(self, cell: SessionCell, session: Session, event: states.Event) -> None:
        if session.qr_status == QR_GENERATED:
            if isinstance(event, states.QRShown):
                self.expire_later(cell, event.expires_at)
        else:
            cell.stop_timer()
