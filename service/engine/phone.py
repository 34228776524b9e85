"""The simulated phone of sessions that run in simulated workers.

``SimulatorService`` drives it: each action becomes a ``SimulatePhone``
command to the session's worker, whose simulated WhatsApp reports what
follows like the real one would. A report the domain refuses during the
action (a scan with no valid code, say) fails the action with that error, and
one that cannot be stored fails it at once with the storage's error (the
supervisor goes on trying to store it).
"""

from __future__ import annotations

from service.domain import errors
from service.domain.contract import DELIVERED, FAILED, READ, MessageStatus
from service.domain.states import SessionRef
from service.engine.process import WorkerProcess
from service.engine.protocol import Command
from service.engine.supervisor import WorkerEngine
from sessionmanager.v1 import session_pb2

Action = Command.SimulatePhone
#: The phone action that has WhatsApp report each receipt.
_RECEIPT_ACTIONS = {
    DELIVERED: Action.ACTION_DELIVER,
    READ: Action.ACTION_READ,
    FAILED: Action.ACTION_FAIL_MESSAGE,
}


class WorkerPhone:
    """``Phone`` over ``simulated-worker`` workers."""

    def __init__(self, engine: WorkerEngine, command_timeout: float = 30.0) -> None:
        self._engine = engine
        self._timeout = command_timeout
        #: Sessions whose next pairing fails: armed in the worker that pairing starts.
        self._pairing_faults: set[SessionRef] = set()
        engine.on_spawn = self._arm_pairing_fault

    async def scan(self, session: SessionRef, phone_number: str, hold_handshake: bool) -> None:
        await self._act(
            session,
            Action(action=Action.ACTION_SCAN, phone_number=phone_number, hold=hold_handshake),
        )

    async def complete_handshake(self, session: SessionRef) -> None:
        await self._act(session, Action(action=Action.ACTION_COMPLETE_HANDSHAKE))

    async def drop_network(self, session: SessionRef, hold_reconnect: bool) -> None:
        await self._act(session, Action(action=Action.ACTION_DROP_NETWORK, hold=hold_reconnect))

    async def unlink(self, session: SessionRef) -> None:
        await self._act(session, Action(action=Action.ACTION_UNLINK))
        await self._engine.logout(session)

    async def fail(self, session: SessionRef, code: str, message: str) -> None:
        await self._act(session, Action(action=Action.ACTION_FAIL, code=code, message=message))

    async def inject_fault(self, session: SessionRef, fault: str) -> None:
        if fault == "pairing":
            self._pairing_faults.add(session)
            return
        await self._act(session, Action(action=Action.ACTION_FAULT_SEND))

    async def receipt(
        self,
        session: SessionRef,
        whatsapp_message_id: str,
        status: MessageStatus,
        code: str = "",
        message: str = "",
    ) -> None:
        action = Action(
            action=_RECEIPT_ACTIONS[status],
            message_id=whatsapp_message_id,
            code=code,
            message=message,
        )
        await self._act(session, action)

    async def _arm_pairing_fault(self, session: SessionRef, worker: WorkerProcess) -> None:
        if session in self._pairing_faults:
            self._pairing_faults.discard(session)
            action = Action(action=Action.ACTION_FAULT_PAIRING)
            await worker.call(Command(simulate_phone=action), self._timeout)

    async def _act(self, session: SessionRef, action: Action) -> None:
        worker = self._engine.worker(session)
        if worker is None or not worker.alive:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_INVALID_TRANSITION,
                f"session {session.instance_id!r} has no running engine worker",
                instance_id=session.instance_id,
            )
        worker.refused = None
        await self._engine.command(
            session,
            Command(simulate_phone=action),
            "NOT_RUNNING",
            "no worker runs",
            after_reports=True,
        )
        if worker.refused is not None:
            raise worker.refused
        if worker.unstored is not None:  # what the phone made happen could not be stored
            raise worker.unstored
