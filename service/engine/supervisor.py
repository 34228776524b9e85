"""The worker supervisor: the engine that runs each session in a worker process.

``WorkerEngine`` is the server's ``Engine`` when sessions run out of process
(``--engine whatsmeow``, or ``--engine simulated-worker``). Each session
incarnation that pairs or is connected gets one worker (``WorkerProcess``);
the supervisor reports what its worker reports, answers for it when it
crashes, hangs or cannot dial, and restarts it:

- a crash (any exit but the protocol's two) is noticed at once through the
  closed pipe; the session shows it (``WORKER_CRASHED`` in ``last_error_*``)
  and the worker comes back after a backoff: a paired device reconnects, a
  pairing shows a new code. After ``crash_limit`` crashes within
  ``crash_window`` seconds the session goes to ``error`` (``WORKER_CRASH_LOOP``);
- a worker that misses its heartbeat is killed (``WORKER_UNRESPONSIVE``) and
  treated as crashed; one that does not dial within ``dial_timeout`` is killed
  (``DIAL_TIMEOUT``);
- a paired device whose connection cannot be made (WhatsApp unreachable) is
  retried with backoff for as long as it takes; it is not a crash;
- at shutdown every worker is asked to stop, then killed; workers also die
  with the server (``PR_SET_PDEATHSIG``) and when their input pipe closes;
- with several nodes, ``hold_until`` gives every worker the node's lease
  deadline (``Hold``): past it a worker ends itself (``EXIT_LEASE_EXPIRED``),
  is neither reported nor restarted, and no worker starts any more.

Credentials live where ``WorkerOptions.credentials`` says (``credentials``): a
folder or a PostgreSQL schema per incarnation, removed on logout and on
deletion, kept when a session is released to another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.clock import Clock
from service.domain import errors, states
from service.domain.contract import LOGOUT, NETWORK, TIMEOUT, UNKNOWN
from service.domain.states import EngineEvent, SessionRef
from service.engine.credentials import LOCATION_VARIABLE, Credentials, DirectoryCredentials
from service.engine.port import EngineError, Report
from service.engine.process import WorkerGone, WorkerProcess
from service.engine.protocol import (
    EXIT_DONE,
    EXIT_LEASE_EXPIRED,
    EXIT_RETRY,
    Command,
    Reply,
    check_reply,
)

log = logging.getLogger(__name__)

Mode = Literal["pair", "connect"]

#: Called with each new pairing worker before it is used (the simulated phone arms faults).
OnSpawn = Callable[[SessionRef, WorkerProcess], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How workers are started and supervised.

    Credentials live in ``credentials``, or, without it, in folders under
    ``devices_dir`` (``DirectoryCredentials``).
    """

    engine: Literal["whatsmeow", "simulated"]
    devices_dir: Path | None = None
    credentials: Credentials | None = None
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 10.0
    dial_timeout: float = 30.0
    command_timeout: float = 30.0
    stop_timeout: float = 5.0
    restart_initial: float = 0.5
    restart_max: float = 30.0
    crash_limit: int = 5
    crash_window: float = 300.0
    log_level: str = "info"
    #: More arguments for ``service.engine.worker`` (the simulated engine's QR timing).
    worker_args: tuple[str, ...] = ()

    def credentials_store(self) -> Credentials:
        if self.credentials is not None:
            return self.credentials
        if self.devices_dir is None:
            raise ValueError("WorkerOptions needs credentials or a devices_dir")
        return DirectoryCredentials(self.devices_dir)


def device_dir(devices_dir: Path, session: SessionRef) -> Path:
    """Where one incarnation's credentials live with ``DirectoryCredentials``."""
    return DirectoryCredentials(devices_dir).folder(session)


@dataclass(eq=False)
class _Slot:
    """What the supervisor knows of one session incarnation."""

    session: SessionRef
    mode: Mode = "pair"
    paired: bool = False
    phone_number: str | None = None
    worker: WorkerProcess | None = None
    crashes: deque[float] = field(default_factory=deque)
    retries: int = 0
    restart: asyncio.Task[None] | None = None


class WorkerEngine:
    """``Engine`` over worker processes, one per session incarnation."""

    resumes_pairing = False

    def __init__(self, options: WorkerOptions, report: Report, clock: Clock) -> None:
        self.options = options
        self._options = options
        self._report = report
        self._clock = clock
        self.credentials = options.credentials_store()
        #: The node's lease deadline on ``time.monotonic()``; ``None``: no deadline.
        self._deadline: float | None = None
        self._slots: dict[SessionRef, _Slot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.on_spawn: OnSpawn | None = None
        #: Called on every restart (the restarts metric).
        self.on_restart: Callable[[], None] = lambda: None

    def worker_pids(self) -> dict[str, int]:
        """The process id of each session's live worker, by instance_id."""
        return {
            ref.instance_id: slot.worker.pid
            for ref, slot in self._slots.items()
            if slot.worker is not None and slot.worker.alive
        }

    def worker(self, session: SessionRef) -> WorkerProcess | None:
        slot = self._slots.get(session)
        return slot.worker if slot is not None else None

    def device_dir(self, session: SessionRef) -> Path:
        """The session's credentials folder (with ``DirectoryCredentials`` only)."""
        if not isinstance(self.credentials, DirectoryCredentials):
            raise TypeError("credentials are not kept in folders")
        return self.credentials.folder(session)

    # Engine.

    async def start_pairing(self, session: SessionRef) -> None:
        slot = self._slot(session)
        self._cancel_restart(slot)
        slot.crashes.clear()
        await self._stop_worker(slot)
        slot.mode, slot.paired, slot.phone_number = "pair", False, None
        await self._pair(slot)

    async def _pair(self, slot: _Slot) -> None:
        self._refuse_past_lease()
        await self.credentials.wipe(slot.session)  # a new pairing is a new device
        worker = await self._spawn(slot)
        try:
            reply = await self._dial(worker, Command(start_pairing=Command.StartPairing()))
        except WorkerGone:
            raise EngineError(*worker.exit_cause()) from None
        if reply.error_code:
            await self._stop_worker(slot, worker)
            check_reply(reply)

    async def restore(self, session: SessionRef, phone_number: str | None) -> None:
        self._refuse_past_lease()
        slot = self._slot(session)
        self._cancel_restart(slot)
        await self._stop_worker(slot)
        slot.mode, slot.paired, slot.phone_number = "connect", True, phone_number
        self._spawn_task(self._connect(slot))

    async def _connect(self, slot: _Slot) -> None:
        worker: WorkerProcess | None = None
        restore = Command.Restore(phone_number=slot.phone_number or "")
        try:
            worker = await self._spawn(slot)
            reply = await self._dial(worker, Command(restore=restore))
        except WorkerGone:
            return
        except EngineError as error:
            if not self._keeps(slot):
                log.info("not reconnecting: %s", error.message, extra=_about(slot))
                return
            reply = Reply(error_code=error.code, error_message=error.message)
        if not reply.error_code:
            slot.retries = 0
            return
        if worker is not None:
            await self._stop_worker(slot, worker)
        if reply.error_code == "NO_CREDENTIALS":
            await self._tell(slot, states.Disconnected(LOGOUT, reply.error_message))
            return
        reason = TIMEOUT if reply.error_code == "DIAL_TIMEOUT" else NETWORK
        delay = self._backoff(slot.retries)
        slot.retries += 1
        message = f"{reply.error_message}; retrying in {delay:g} s"
        await self._tell(slot, states.Disconnected(reason, message, reply.error_code))
        self._schedule_restart(slot, delay)

    async def _dial(self, worker: WorkerProcess, command: Command) -> Reply:
        """Send the command that connects; a worker that takes too long is killed."""
        timeout = self._options.dial_timeout
        try:
            return await worker.call(command, timeout)
        except TimeoutError:
            message = f"WhatsApp did not answer within {timeout:g} s"
            worker.stopping = True
            worker.kill("DIAL_TIMEOUT", message)
            raise EngineError("DIAL_TIMEOUT", message) from None
        except WorkerGone:
            # The exit is handled (reported, counted, restarted) by ``_exited``.
            await asyncio.shield(worker.exited)
            raise

    async def pair_phone(self, session: SessionRef, phone_number: str) -> str:
        command = Command(pair_phone=Command.PairPhone(phone_number=phone_number))
        reply = await self.command(session, command, "NOT_PAIRING", "no pairing is under way")
        return reply.linking_code

    async def stop_pairing(self, session: SessionRef) -> None:
        slot = self._slots.get(session)
        if slot is not None and slot.mode == "pair" and not slot.paired:
            self._cancel_restart(slot)
            await self._stop_worker(slot)

    async def send(self, session: SessionRef, to: str, text: str) -> str:
        command = Command(send_text=Command.SendText(to=to, text=text))
        reply = await self.command(session, command, "NOT_CONNECTED", "the device is not connected")
        return reply.message_id

    async def logout(self, session: SessionRef) -> None:
        slot = self._slots.pop(session, None)
        try:
            if slot is not None:
                self._cancel_restart(slot)
                worker = slot.worker
                if worker is not None and worker.alive:
                    with contextlib.suppress(WorkerGone, TimeoutError):
                        await worker.call(Command(logout=Command.Logout()), 10.0)
                await self._stop_worker(slot)
        finally:
            await self._wipe_credentials(session)

    async def release(self, session: SessionRef) -> None:
        slot = self._slots.pop(session, None)
        if slot is not None:
            self._cancel_restart(slot)
            await self._stop_worker(slot)  # a stopping worker's reports are not relayed
            log.info("released to another node", extra=_about(slot))

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        for session in set(self._slots) - kept:
            await self.logout(session)
        await self.credentials.forget_all_but(kept)

    def hold_until(self, deadline: float | None) -> None:
        self._deadline = deadline
        for slot in self._slots.values():
            if slot.worker is not None:
                slot.worker.hold(deadline)

    def _lease_expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _refuse_past_lease(self) -> None:
        if self._lease_expired():
            raise EngineError(
                "LEASE_EXPIRED", "this node's lease on its sessions ran out; no worker starts"
            )

    def _keeps(self, slot: _Slot) -> bool:
        """Whether the slot is still this engine's to run: not released, logged out or expired."""
        mine = self._slots.get(slot.session) is slot
        return mine and not self._closed and not self._lease_expired()

    async def _wipe_credentials(self, session: SessionRef) -> None:
        """Forget the credentials; a failure is logged (the next pairing wipes them first)."""
        try:
            await self.credentials.wipe(session)
        except EngineError as error:
            log.warning(
                "could not remove the credentials: %s",
                error.message,
                extra={"instance_id": session.instance_id},
            )

    async def close(self) -> None:
        self._closed = True
        for slot in self._slots.values():
            self._cancel_restart(slot)
        await asyncio.gather(*(self._stop_worker(s) for s in self._slots.values()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # Commands.

    async def command(
        self, session: SessionRef, command: Command, missing_code: str, missing_message: str
    ) -> Reply:
        """Send ``command`` to the session's worker; its reply or the EngineError."""
        slot = self._slots.get(session)
        worker = slot.worker if slot is not None else None
        if worker is None or not worker.alive:
            raise EngineError(missing_code, missing_message)
        timeout = self._options.command_timeout
        try:
            reply = await worker.call(command, timeout)
        except TimeoutError:
            raise EngineError(
                "ENGINE_TIMEOUT",
                f"the engine did not answer within {timeout:g} s",
                definite=False,
            ) from None
        except WorkerGone:
            raise EngineError(
                "WORKER_GONE", "the engine worker exited during the call", definite=False
            ) from None
        return check_reply(reply)

    # Processes.

    def _slot(self, session: SessionRef) -> _Slot:
        slot = self._slots.get(session)
        if slot is None:
            slot = self._slots[session] = _Slot(session)
        return slot

    async def _spawn(self, slot: _Slot) -> WorkerProcess:
        if self._closed:
            raise EngineError("SHUTTING_DOWN", "the Session Manager is shutting down")
        self._refuse_past_lease()
        options, session = self._options, slot.session
        location = await self.credentials.prepare(session)
        arguments = [
            f"--engine={options.engine}",
            f"--instance-id={session.instance_id}",
            f"--session-id={session.id}",
            f"--parent-pid={os.getpid()}",
            f"--log-level={options.log_level}",
            *options.worker_args,
        ]

        async def on_report(worker: WorkerProcess, event: EngineEvent) -> None:
            await self._relay(slot, worker, event)

        environment = {LOCATION_VARIABLE: location}
        worker = await WorkerProcess.start(
            session, arguments, on_report, self._clock.now, environment
        )
        if self._deadline is not None:
            # Only once it reads its commands: a worker slow to start (a loaded machine)
            # would otherwise read a deadline renewed since, as passed, and end itself.
            await self._until_ready(worker)
            worker.hold(self._deadline)  # before anything connects
        if not self._keeps(slot):  # released, logged out or expired while it started
            await worker.stop(options.stop_timeout)
            raise EngineError("WORKER_NOT_NEEDED", "the session left this engine while it started")
        slot.worker = worker
        self._spawn_task(self._watch(slot, worker))
        self._spawn_task(self._heartbeat(worker))
        if self.on_spawn is not None and slot.mode == "pair":
            await self.on_spawn(session, worker)
        log.info(
            "worker %d started (%s)",
            worker.pid,
            slot.mode,
            extra={"instance_id": session.instance_id},
        )
        return worker

    async def _until_ready(self, worker: WorkerProcess) -> None:
        """Wait until the worker answers (it reads its commands); it does nothing before that."""
        try:
            await worker.call(Command(ping=Command.Ping()), self._options.command_timeout)
        except (WorkerGone, TimeoutError):
            worker.kill("WORKER_NOT_READY", "the engine worker did not start")
            raise EngineError(*worker.exit_cause()) from None

    async def _stop_worker(self, slot: _Slot, worker: WorkerProcess | None = None) -> None:
        worker = worker or slot.worker
        if worker is None:
            return
        if slot.worker is worker:
            slot.worker = None
        await worker.stop(self._options.stop_timeout)

    async def _relay(self, slot: _Slot, worker: WorkerProcess, event: EngineEvent) -> None:
        """Report what the worker reported, in the order it came."""
        if self._lease_expired():
            return  # the node may no longer own the session: it commits nothing about it
        match event:
            case states.QRScanned():
                slot.paired = True
            case states.Connected(phone_number):
                slot.paired, slot.retries, slot.phone_number = True, 0, phone_number
            case states.Disconnected(reason) if reason == LOGOUT:
                slot.paired = False  # unlinked: the stored device is worthless
                await self._wipe_credentials(slot.session)
        try:
            await self._report(slot.session, event)
        except errors.ContractError as error:
            worker.refused = error
            log.info(
                "report %s refused: %s",
                type(event).__name__,
                error.message,
                extra={"instance_id": slot.session.instance_id},
            )

    async def _watch(self, slot: _Slot, worker: WorkerProcess) -> None:
        returncode = await asyncio.shield(worker.exited)
        if slot.worker is worker:
            slot.worker = None
        if not worker.stopping and not self._closed:
            await self._exited(slot, worker, returncode)

    async def _exited(self, slot: _Slot, worker: WorkerProcess, returncode: int) -> None:
        session = slot.session
        if returncode == EXIT_LEASE_EXPIRED or self._lease_expired():
            # No report, no restart: the node has lost the right to commit anything
            # about the session (another node may already run it).
            log.warning("the lease ran out: the worker ended (%d)", returncode, extra=_about(slot))
            return
        if slot.paired:
            slot.mode = "connect"  # whatever comes next reconnects the paired device
        if returncode == EXIT_DONE:
            log.info("worker finished", extra={"instance_id": session.instance_id})
            return
        if returncode == EXIT_RETRY:
            if slot.paired:
                self._schedule_restart(slot, self._backoff(slot.retries))
                slot.retries += 1
            return
        code, message = worker.exit_cause()
        log.warning("%s: %s", code, message, extra={"instance_id": session.instance_id})
        now = asyncio.get_running_loop().time()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self._options.crash_window:
            slot.crashes.popleft()
        if len(slot.crashes) >= self._options.crash_limit:
            failed = states.Failed(
                "WORKER_CRASH_LOOP",
                f"The engine worker failed {len(slot.crashes)} times within "
                f"{self._options.crash_window:g} s (last: {message}); it is not restarted. "
                "Request a new QR code, or restart the server, to try again",
            )
            await self._tell(slot, failed)
            return
        delay = self._backoff(len(slot.crashes) - 1)
        if slot.paired:
            await self._tell(slot, states.Disconnected(UNKNOWN, f"{message}; restarting it", code))
        else:
            await self._tell(slot, states.PairingFailed(code, f"{message}; a new QR code follows"))
        self._schedule_restart(slot, delay)

    def _schedule_restart(self, slot: _Slot, delay: float) -> None:
        self._cancel_restart(slot)
        slot.restart = self._spawn_task(self._restart(slot, delay))

    def _cancel_restart(self, slot: _Slot) -> None:
        if slot.restart is not None and slot.restart is not asyncio.current_task():
            slot.restart.cancel()
        slot.restart = None

    async def _restart(self, slot: _Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        slot.restart = None
        if not self._keeps(slot):
            return
        self.on_restart()
        log.info(
            "restarting the worker (%s)", slot.mode, extra={"instance_id": slot.session.instance_id}
        )
        if slot.mode == "connect":
            await self._tell(slot, states.Reconnecting())
            await self._connect(slot)
            return
        try:
            await self._pair(slot)
        except EngineError as error:
            await self._tell(slot, states.PairingFailed(error.code, error.message))

    def _backoff(self, attempt: int) -> float:
        options = self._options
        return float(min(options.restart_max, options.restart_initial * 2 ** max(attempt, 0)))

    async def _heartbeat(self, worker: WorkerProcess) -> None:
        options = self._options
        while worker.alive:
            await asyncio.sleep(options.heartbeat_interval)
            try:
                await worker.call(Command(ping=Command.Ping()), options.heartbeat_timeout)
            except TimeoutError:
                worker.kill(
                    "WORKER_UNRESPONSIVE",
                    f"The engine worker did not answer for {options.heartbeat_timeout:g} s "
                    "and was killed",
                )
                return
            except WorkerGone:
                return

    async def _tell(self, slot: _Slot, event: EngineEvent) -> None:
        """Report a fact the supervisor itself observed; a refusal only means it moved on."""
        if self._lease_expired():
            return
        try:
            await self._report(slot.session, event)
        except errors.ContractError as error:  # the session was deleted or moved on
            log.info("report refused: %s", error.message)

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _about(slot: _Slot) -> dict[str, str]:
    return {"instance_id": slot.session.instance_id}
