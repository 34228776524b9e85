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
- a report that cannot be stored (a full disk, an unreachable database) is
  retried with backoff while its worker runs, for ``report_retry_for``
  seconds; past that the worker is stopped (``REPORT_NOT_STORED``), and once
  storage accepts writes again the session says so and the worker comes back.
  What the supervisor itself has to say is retried until it is stored;
- at shutdown every worker is asked to stop, then killed; workers also die
  with the server (``PR_SET_PDEATHSIG``) and when their input pipe closes.
  Every wait for a worker has a bound, and a logged outcome when it runs out;
- with several nodes, ``hold`` gives each session's worker its own lease
  deadline and epoch (``Hold``): past it the worker ends itself
  (``EXIT_LEASE_EXPIRED``), is neither reported nor restarted, and no worker
  starts for that session any more; ``revoke`` does the same at once.

Credentials live where ``WorkerOptions.credentials`` says (``credentials``): a
folder or a PostgreSQL schema per incarnation, removed on logout and on
deletion, kept when a session is released to another node, and fenced by the
lease's epoch before a worker starts (``Credentials.prepare``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.clock import Clock, boottime
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
    #: How long a report that cannot be stored is retried before its worker is stopped.
    report_retry_for: float = 15.0
    report_retry_initial: float = 0.1
    report_retry_max: float = 2.0
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


def _settled() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


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
    #: The epoch of the lease its worker runs under (0: no lease).
    epoch: int = 0
    #: The node lost the session's lease: nothing of it is reported, started or restarted.
    revoked: bool = False
    #: Why a report of its last worker was lost, until the session has been told.
    lost_report: str | None = None
    #: A worker being started, not yet in use: a stop, a release or a revoke ends it too.
    starting: WorkerProcess | None = None
    #: How many workers are being started; ``settled`` is set while none is.
    spawns: int = 0
    settled: asyncio.Event = field(default_factory=_settled)


@dataclass(frozen=True, slots=True)
class _Hold:
    """A session's lease, as its node holds it: until when (``boottime()``), and its epoch."""

    until: float
    epoch: int


#: How long the worker of a session being logged out may take to confirm it.
LOGOUT_TIMEOUT = 10.0
REPORT_NOT_STORED = "REPORT_NOT_STORED"


class WorkerEngine:
    """``Engine`` over worker processes, one per session incarnation."""

    resumes_pairing = False

    def __init__(self, options: WorkerOptions, report: Report, clock: Clock) -> None:
        self.options = options
        self._options = options
        self._report = report
        self._clock = clock
        self.credentials = options.credentials_store()
        #: Each held session's lease, by instance_id (several nodes).
        self._holds: dict[str, _Hold] = {}
        #: Whether a node gives this engine holds: then a session without a valid one
        #: does not run. An engine never given one runs its sessions with no deadline.
        self._leased = False
        self._slots: dict[SessionRef, _Slot] = {}
        #: The incarnations in ``_slots`` of each instance_id (one, but around a re-creation).
        self._incarnations: dict[str, set[SessionRef]] = {}
        #: Slots whose lease was revoked and whose worker is being ended, until released.
        self._revoked: dict[SessionRef, list[_Slot]] = {}
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
        self._refuse_unless_held(slot.session.instance_id)
        # A new pairing is a new device.
        await self.credentials.wipe(slot.session, self._epoch(slot.session.instance_id))
        worker = await self._spawn(slot)
        try:
            reply = await self._dial(worker, Command(start_pairing=Command.StartPairing()))
        except WorkerGone:
            raise EngineError(*worker.exit_cause()) from None
        if reply.error_code:
            await self._stop_worker(slot, worker)
            check_reply(reply)
        if worker.unstored is not None:
            # Its first code is not stored yet: the report is being retried, and this call
            # ends with it (shown, or lost with its worker), never while it may still land.
            error = await worker.report_settled()
            if error is not None:  # lost: the caller is told, and nothing starts behind its back
                worker.mark_stopping()
                slot.lost_report = None
                await self._stop_worker(slot, worker)
                raise error

    async def restore(self, session: SessionRef, phone_number: str | None) -> None:
        self._refuse_unless_held(session.instance_id)
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
        """Send the command that connects; a worker that takes too long is killed.

        Its reply comes after what the worker reported on the way (a pairing's
        first code), or as soon as that could not be stored.
        """
        timeout = self._options.dial_timeout
        try:
            return await worker.call(command, timeout, after_reports=True)
        except TimeoutError:
            message = f"WhatsApp did not answer within {timeout:g} s"
            worker.mark_stopping()
            worker.kill("DIAL_TIMEOUT", message)
            raise EngineError("DIAL_TIMEOUT", message) from None
        except WorkerGone:
            # The exit is handled (reported, counted, restarted) by ``_exited``; its cause
            # is known once it has exited.
            await worker.wait_exit(self._options.stop_timeout)
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
        slot = self._pop_slot(session)
        try:
            if slot is not None:
                self._cancel_restart(slot)
                worker = slot.worker
                if worker is not None and worker.alive:
                    await self._unlink(worker)
                await self._stop_worker(slot)
        finally:
            await self._wipe_credentials(session)

    async def _unlink(self, worker: WorkerProcess) -> None:
        """Have the worker unlink its device; a worker that cannot is stopped all the same."""
        try:
            await worker.call(Command(logout=Command.Logout()), LOGOUT_TIMEOUT)
        except TimeoutError:
            log.warning(
                "the worker did not confirm the logout within %g s; stopping it",
                LOGOUT_TIMEOUT,
                extra={"instance_id": worker.session.instance_id},
            )
        except WorkerGone:
            log.info(
                "the worker ended before it logged out",
                extra={"instance_id": worker.session.instance_id},
            )

    async def release(self, session: SessionRef) -> None:
        slots = [*self._revoked.pop(session, [])]
        kept = self._pop_slot(session)
        if kept is not None:
            slots.append(kept)
        for slot in slots:
            self._cancel_restart(slot)
            await self._stop_worker(slot)  # a stopping worker's reports are not relayed
        if slots:
            log.info("released to another node", extra=_about(slots[-1]))

    async def forget_all_but(self, kept: set[SessionRef]) -> None:
        for session in set(self._slots) - kept:
            await self.logout(session)
        await self.credentials.forget_all_but(kept)

    def hold(self, instance_id: str, until: float, epoch: int) -> None:
        self._leased = True
        self._holds[instance_id] = _Hold(until, epoch)
        for slot in self._slots_of(instance_id):
            if slot.epoch not in (0, epoch):  # started under a lease that is gone
                self._revoke_slot(slot, f"its lease moved on to epoch {epoch}")
            elif slot.worker is not None:
                slot.worker.hold(until, epoch)

    def revoke(self, instance_id: str) -> None:
        self._leased = True
        self._holds.pop(instance_id, None)
        for slot in self._slots_of(instance_id):
            self._revoke_slot(slot, "the node lost its lease")

    def _revoke_slot(self, slot: _Slot, why: str) -> None:
        """Set the slot aside for good: no report, no restart, its worker killed now."""
        slot.revoked = True
        self._cancel_restart(slot)
        if self._slots.get(slot.session) is slot:
            self._pop_slot(slot.session)
        self._revoked.setdefault(slot.session, []).append(slot)
        for worker in (slot.worker, slot.starting):
            if worker is not None and worker.alive:
                worker.mark_stopping()
                worker.kill("LEASE_LOST", f"the session's worker was ended: {why}")
                log.warning("ended the worker at once: %s", why, extra=_about(slot))

    def _slots_of(self, instance_id: str) -> list[_Slot]:
        return [self._slots[ref] for ref in self._incarnations.get(instance_id, ())]

    def _epoch(self, instance_id: str) -> int | None:
        """The epoch of the session's lease, or None where no leases are held."""
        hold = self._holds.get(instance_id)
        return hold.epoch if hold is not None else None

    def _may_run(self, instance_id: str) -> bool:
        """Whether the session may run here: held and within its deadline (or no leases)."""
        if not self._leased:
            return True
        hold = self._holds.get(instance_id)
        return hold is not None and boottime() < hold.until

    def _refuse_unless_held(self, instance_id: str) -> None:
        if not self._may_run(instance_id):
            raise EngineError(
                "LEASE_EXPIRED",
                "this node holds no valid lease on the session; no worker starts",
            )

    def _keeps(self, slot: _Slot) -> bool:
        """Whether the slot is still this engine's to run: not released, logged out or expired."""
        mine = self._slots.get(slot.session) is slot
        return mine and not self._closed and self._may_report(slot)

    def _may_report(self, slot: _Slot) -> bool:
        """Whether this node may still commit what happens to the slot's session."""
        return not slot.revoked and self._may_run(slot.session.instance_id)

    async def _wipe_credentials(self, session: SessionRef) -> None:
        """Forget the credentials; a failure is logged (the next pairing wipes them first)."""
        try:
            await self.credentials.wipe(session, self._epoch(session.instance_id))
        except EngineError as error:
            log.warning(
                "could not remove the credentials: %s",
                error.message,
                extra={"instance_id": session.instance_id},
            )

    async def close(self) -> None:
        self._closed = True
        slots = [*self._slots.values(), *(s for each in self._revoked.values() for s in each)]
        for slot in slots:
            self._cancel_restart(slot)
        await asyncio.gather(*(self._stop_worker(slot) for slot in slots))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=self._options.stop_timeout)
            if pending:
                log.error(
                    "%d engine tasks did not end within %g s of shutdown",
                    len(pending),
                    self._options.stop_timeout,
                )

    # Commands.

    async def command(
        self,
        session: SessionRef,
        command: Command,
        missing_code: str,
        missing_message: str,
        *,
        after_reports: bool = False,
    ) -> Reply:
        """Send ``command`` to the session's worker; its reply or the EngineError.

        With ``after_reports`` it returns once what the worker reported before
        replying was relayed (``WorkerProcess.call``).
        """
        slot = self._slots.get(session)
        worker = slot.worker if slot is not None else None
        if worker is None or not worker.alive:
            raise EngineError(missing_code, missing_message)
        timeout = self._options.command_timeout
        try:
            reply = await worker.call(command, timeout, after_reports=after_reports)
        except TimeoutError:
            raise EngineError(
                "ENGINE_TIMEOUT",
                f"the engine did not answer within {timeout:g} s",
                definite=False,
            ) from None
        except WorkerGone as gone:
            if not gone.delivered:
                raise EngineError(missing_code, f"{missing_message}: its worker ended") from None
            raise EngineError(
                "WORKER_GONE", "the engine worker exited during the call", definite=False
            ) from None
        return check_reply(reply)

    # Processes.

    def _slot(self, session: SessionRef) -> _Slot:
        slot = self._slots.get(session)
        if slot is None:
            slot = self._slots[session] = _Slot(session)
            self._incarnations.setdefault(session.instance_id, set()).add(session)
        return slot

    def _pop_slot(self, session: SessionRef) -> _Slot | None:
        slot = self._slots.pop(session, None)
        incarnations = self._incarnations.get(session.instance_id)
        if incarnations is not None:
            incarnations.discard(session)
            if not incarnations:
                del self._incarnations[session.instance_id]
        return slot

    async def _spawn(self, slot: _Slot) -> WorkerProcess:
        """Start a worker for the slot; a stop, release or revoke meanwhile ends it too, and
        waits (``_stop_starting``) until this has given up."""
        slot.spawns += 1
        slot.settled.clear()
        try:
            return await self._start(slot)
        finally:
            slot.spawns -= 1
            if slot.spawns == 0:
                slot.settled.set()

    async def _start(self, slot: _Slot) -> WorkerProcess:
        if self._closed:
            raise EngineError("SHUTTING_DOWN", "the Session Manager is shutting down")
        options, session = self._options, slot.session
        self._refuse_unless_held(session.instance_id)
        epoch = self._epoch(session.instance_id)
        slot.epoch, slot.lost_report = epoch or 0, None  # a new worker says anew what holds
        location = await self.credentials.prepare(session, epoch)
        self._refuse_unless_kept(slot)
        arguments = [
            f"--engine={options.engine}",
            f"--instance-id={session.instance_id}",
            f"--session-id={session.id}",
            f"--epoch={slot.epoch}",
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
        slot.starting = worker
        try:
            if self._keeps(slot) and self._leased:
                # Only once it reads its commands: a worker slow to start (a loaded machine)
                # would otherwise read a deadline renewed since, as passed, and end itself.
                await self._until_ready(worker)
                hold = self._holds.get(session.instance_id)
                if hold is not None and hold.epoch == slot.epoch:
                    worker.hold(hold.until, hold.epoch)  # before anything connects
            if not self._keeps(slot) or worker.stopping:
                await worker.stop(options.stop_timeout)
                self._refuse_unless_kept(slot)
                raise EngineError("WORKER_NOT_NEEDED", "the worker was stopped while it started")
        finally:
            slot.starting = None
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

    def _refuse_unless_kept(self, slot: _Slot) -> None:
        if not self._keeps(slot):  # released, logged out, revoked or expired meanwhile
            raise EngineError("WORKER_NOT_NEEDED", "the session left this engine while it started")

    async def _until_ready(self, worker: WorkerProcess) -> None:
        """Wait until the worker answers (it reads its commands); it does nothing before that."""
        try:
            await worker.call(Command(ping=Command.Ping()), self._options.command_timeout)
        except (WorkerGone, TimeoutError):
            if worker.stopping:
                raise EngineError(
                    "WORKER_NOT_NEEDED", "the worker was stopped while it started"
                ) from None
            worker.kill("WORKER_NOT_READY", "the engine worker did not start")
            await worker.wait_exit(self._options.stop_timeout)
            raise EngineError(*worker.exit_cause()) from None

    async def _stop_worker(self, slot: _Slot, worker: WorkerProcess | None = None) -> None:
        """Stop ``worker``, or the slot's: the one in use and any being started."""
        if worker is None:
            await self._stop_starting(slot)
        worker = worker or slot.worker
        if worker is None:
            return
        if slot.worker is worker:
            slot.worker = None
        await worker.stop(self._options.stop_timeout)

    async def _stop_starting(self, slot: _Slot) -> None:
        """Stop a worker being started for the slot, and wait until its start has given up,
        so that no worker of the slot outlives this (bounded; logged if it runs out)."""
        starting = slot.starting
        if starting is not None:
            await starting.stop(self._options.stop_timeout)
        if slot.settled.is_set():
            return
        try:
            await asyncio.wait_for(slot.settled.wait(), self._options.stop_timeout)
        except TimeoutError:
            log.warning(
                "a worker was still being started %g s after it was stopped",
                self._options.stop_timeout,
                extra=_about(slot),
            )

    # Reports.

    async def _relay(self, slot: _Slot, worker: WorkerProcess, event: EngineEvent) -> None:
        """Report what the worker reported, in the order it came."""
        if not self._may_report(slot):
            return  # the node may no longer own the session: it commits nothing about it
        match event:
            case states.QRScanned():
                slot.paired = True
            case states.Connected(phone_number):
                slot.paired, slot.retries, slot.phone_number = True, 0, phone_number
            case states.Disconnected(reason) if reason == LOGOUT:
                slot.paired = False  # unlinked: the stored device is worthless
        committed = await self._store(slot, worker, event)
        if committed and isinstance(event, states.Disconnected) and event.reason == LOGOUT:
            await self._wipe_credentials(slot.session)  # the unlink is stored: its effect follows

    async def _store(self, slot: _Slot, worker: WorkerProcess, event: EngineEvent) -> bool:
        """Commit a worker's report; whether it was committed (a refusal is kept for the
        simulated phone in ``worker.refused``; a storage failure is retried: ``_store_later``)."""
        try:
            await self._report(slot.session, event)
        except errors.ContractError as error:
            self._refused(slot, worker, event, error)
            return False
        except Exception as error:  # noqa: BLE001 - a storage failure: retried, or given up
            return await self._store_later(slot, worker, event, error)
        return True

    async def _store_later(
        self, slot: _Slot, worker: WorkerProcess, event: EngineEvent, error: Exception
    ) -> bool:
        """Retry a report whose commit failed; whether it was committed in the end.

        Tried again with backoff while the worker runs and the session is this
        engine's to report, for at most ``report_retry_for`` seconds; the
        reports after it wait, so that they are stored in order, and
        ``worker.unstored`` says why meanwhile. Past that, or once the worker
        has ended, the report is lost: the worker is killed, the reports queued
        after it are dropped, and ``_exited`` tells the session.
        """
        options, kind, loop = self._options, type(event).__name__, asyncio.get_running_loop()
        log.warning(
            "could not store the worker's %s report (%s); retrying for up to %g s",
            kind,
            _one_line(error),
            options.report_retry_for,
            extra=_about(slot),
        )
        started, delay = loop.time(), options.report_retry_initial
        while True:
            worker.note_unstored(error)
            if not self._still_reports(slot, worker):
                return False
            if not worker.alive or loop.time() - started >= options.report_retry_for:
                self._give_up(slot, worker, kind, error)
                return False
            await worker.idle(delay)
            delay = min(delay * 2, options.report_retry_max)
            if not self._still_reports(slot, worker):
                return False
            try:
                await self._report(slot.session, event)
            except errors.ContractError as refusal:
                worker.note_unstored(None)
                self._refused(slot, worker, event, refusal)
                return False
            except Exception as again:  # noqa: BLE001 - still failing
                error = again
                continue
            worker.note_unstored(None)
            log.info("stored the worker's %s report after retrying", kind, extra=_about(slot))
            return True

    def _still_reports(self, slot: _Slot, worker: WorkerProcess) -> bool:
        """Whether the worker's reports are still this engine's to store."""
        return not worker.stopping and self._may_report(slot)

    def _refused(
        self, slot: _Slot, worker: WorkerProcess, event: EngineEvent, error: errors.ContractError
    ) -> None:
        worker.refused = error
        log.info("report %s refused: %s", type(event).__name__, error.message, extra=_about(slot))

    def _give_up(self, slot: _Slot, worker: WorkerProcess, kind: str, error: Exception) -> None:
        """A report is lost: the worker goes, and the session is told once storage allows it."""
        slot.lost_report = (
            f"The engine's {kind} report could not be stored ({_one_line(error)}); "
            "its worker was stopped"
        )
        log.error("%s", slot.lost_report, extra=_about(slot))
        worker.give_up_reports(REPORT_NOT_STORED, slot.lost_report)

    async def _tell(self, slot: _Slot, event: EngineEvent) -> None:
        """Report a fact the supervisor itself observed.

        A refusal only means the session moved on. A storage failure is retried
        with backoff until the fact is stored, or the session is no longer this
        engine's to run: what the supervisor knows is never lost silently.
        """
        options, kind = self._options, type(event).__name__
        delay, failing = options.report_retry_initial, False
        while self._may_report(slot):
            try:
                await self._report(slot.session, event)
            except errors.ContractError as error:  # the session was deleted or moved on
                log.info("report %s refused: %s", kind, error.message, extra=_about(slot))
                return
            except Exception as error:  # noqa: BLE001 - a storage failure: tried again
                if not failing:
                    failing = True
                    log.warning(
                        "could not store %s (%s); retrying until it is",
                        kind,
                        _one_line(error),
                        extra=_about(slot),
                    )
                if not self._keeps(slot):
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, options.report_retry_max)
                continue
            if failing:
                log.info("stored %s after retrying", kind, extra=_about(slot))
            return

    # Exits and restarts.

    async def _watch(self, slot: _Slot, worker: WorkerProcess) -> None:
        returncode = await asyncio.shield(worker.exited)
        if slot.worker is worker:
            slot.worker = None
        if slot.revoked:
            self._forget_revoked(slot)
            return
        if not worker.stopping and not self._closed:
            await self._exited(slot, worker, returncode)

    def _forget_revoked(self, slot: _Slot) -> None:
        revoked = self._revoked.get(slot.session, [])
        if slot in revoked:
            revoked.remove(slot)
        if not revoked:
            self._revoked.pop(slot.session, None)

    async def _exited(self, slot: _Slot, worker: WorkerProcess, returncode: int) -> None:
        session = slot.session
        if not self._may_report(slot):
            # No report, no restart: the node has lost the right to commit anything
            # about the session (another node may already run it).
            log.warning("the lease ran out: the worker ended (%d)", returncode, extra=_about(slot))
            return
        if slot.paired:
            slot.mode = "connect"  # whatever comes next reconnects the paired device
        if slot.lost_report is not None:
            await self._retell(slot)
            return
        if returncode == EXIT_LEASE_EXPIRED:
            # It read a deadline the node has extended since (it read its Holds late):
            # the node still holds the lease, so the session goes on in a new worker.
            log.warning("the worker ended on a passed deadline; the lease runs on: restarting it")
            if slot.paired and self._keeps(slot):
                self._schedule_restart(slot, 0.0)
            return
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

    async def _retell(self, slot: _Slot) -> None:
        """After a lost report, say what is known (once it can be stored), then start again.

        The lost report and the ones after it described a worker that is gone;
        the session shows that its connection's state is not known and comes
        back in a new worker. Not counted as a crash: the worker did nothing wrong.
        """
        message, slot.lost_report = slot.lost_report or "", None
        if slot.paired:
            event: EngineEvent = states.Disconnected(
                UNKNOWN, f"{message}; restarting it", REPORT_NOT_STORED
            )
        else:
            event = states.PairingFailed(REPORT_NOT_STORED, f"{message}; a new QR code follows")
        await self._tell(slot, event)
        self._schedule_restart(slot, self._options.restart_initial)

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
            if self._keeps(slot):
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

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("an engine task failed: %s", _one_line(error))


def _one_line(error: BaseException) -> str:
    """An error as one line: its message, or its type when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _about(slot: _Slot) -> dict[str, str]:
    return {"instance_id": slot.session.instance_id}
