"""The worker supervisor: the engine that runs each session in a worker process.

``WorkerEngine`` is the server's ``Engine`` when sessions run out of process
(``--engine whatsmeow``, or ``--engine simulated-worker``). Each session that
pairs or is connected gets one worker (``service.engine.worker``); the supervisor
relays the worker's reports to the Session Manager in order, answers for it
when it crashes, hangs or cannot dial, and restarts it:

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
  with the server (``PR_SET_PDEATHSIG``) and when their input pipe closes.

Credentials live in ``devices_dir/<instance_id>/`` and are removed on logout
and on deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.api.metrics import Metrics
from service.clock import Clock
from service.domain import errors
from service.domain.contract import LOGOUT, NETWORK, TIMEOUT, UNKNOWN
from service.engine.port import EngineError, EngineEvents
from service.engine.protocol import EXIT_DONE, EXIT_RETRY, ProtocolError, encode, read_frame
from sessionmanager.v1 import session_pb2, worker_pb2

log = logging.getLogger(__name__)

Command = worker_pb2.WorkerCommand
Event = worker_pb2.WorkerEvent
Action = worker_pb2.WorkerCommand.SimulatePhone
Mode = Literal["pair", "connect"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How workers are started and supervised."""

    engine: Literal["whatsmeow", "simulated"]
    devices_dir: Path
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


class WorkerGone(Exception):
    """The worker exited before it answered."""


@dataclass(eq=False)
class _Worker:
    """One worker process and the calls it has not answered yet."""

    process: asyncio.subprocess.Process
    pending: dict[int, asyncio.Future[Event.Reply]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    stopping: bool = False
    #: Why the supervisor killed it, as (code, message), if it did.
    killed_for: tuple[str, str] | None = None
    #: A report the Session Manager refused during the last phone command.
    rejected: errors.ContractError | None = None
    exited: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    async def call(self, command: Command, within: float) -> Event.Reply:
        if not self.alive or self.process.stdin is None:
            raise WorkerGone("the worker has exited")
        command.id = next(self.ids)
        reply = asyncio.get_running_loop().create_future()
        self.pending[command.id] = reply
        try:
            self.process.stdin.write(encode(command))
            await self.process.stdin.drain()
            return await asyncio.wait_for(asyncio.shield(reply), within)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerGone("the worker has exited") from error
        finally:
            self.pending.pop(command.id, None)

    def kill(self, code: str, message: str) -> None:
        if self.alive and self.process.returncode is None:
            self.killed_for = self.killed_for or (code, message)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


@dataclass(eq=False)
class _Slot:
    """What the supervisor knows of one session."""

    instance_id: str
    mode: Mode = "pair"
    paired: bool = False
    phone_number: str | None = None
    worker: _Worker | None = None
    crashes: deque[float] = field(default_factory=deque)
    retries: int = 0
    restart: asyncio.Task[None] | None = None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class WorkerEngine:
    """``Engine`` (and, for simulated workers, ``Phone``) over worker processes."""

    resumes_pairing = False

    def __init__(
        self, options: WorkerOptions, clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self._options = options
        self._clock = clock
        self._metrics = metrics
        self._slots: dict[str, _Slot] = {}
        self._events: EngineEvents | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        #: Sessions whose next simulated pairing fails (SimulatorService.InjectFault).
        self._pairing_faults: set[str] = set()

    @property
    def events(self) -> EngineEvents:
        assert self._events is not None, "bind() first"
        return self._events

    def bind(self, events: EngineEvents) -> None:
        self._events = events

    def worker_pids(self) -> dict[str, int]:
        """The process id of each session's live worker."""
        return {
            iid: slot.worker.process.pid
            for iid, slot in self._slots.items()
            if slot.worker is not None and slot.worker.alive
        }

    def device_dir(self, instance_id: str) -> Path:
        return self._options.devices_dir / instance_id

    # Engine.

    async def start_pairing(self, instance_id: str) -> None:
        slot = self._slot(instance_id)
        self._cancel_restart(slot)
        slot.crashes.clear()
        await self._stop_worker(slot)
        slot.mode, slot.paired, slot.phone_number = "pair", False, None
        await self._pair(slot)

    async def _pair(self, slot: _Slot) -> None:
        self._wipe_credentials(slot.instance_id)  # a new pairing is a new device
        worker = await self._spawn(slot)
        try:
            reply = await self._dial(worker, Command(start_pairing=Command.StartPairing()))
        except WorkerGone:
            raise EngineError(*self._exit_cause(worker)) from None
        if reply.error_code:
            await self._stop_worker(slot, worker)
            raise EngineError(reply.error_code, reply.error_message)

    async def restore(self, instance_id: str, phone_number: str | None) -> None:
        slot = self._slot(instance_id)
        self._cancel_restart(slot)
        await self._stop_worker(slot)
        slot.mode, slot.paired, slot.phone_number = "connect", True, phone_number
        self._spawn_task(self._connect(slot))

    async def _connect(self, slot: _Slot) -> None:
        worker = await self._spawn(slot)
        restore = Command.Restore(phone_number=slot.phone_number or "")
        try:
            reply = await self._dial(worker, Command(restore=restore))
        except WorkerGone:
            return
        except EngineError as error:
            reply = Event.Reply(error_code=error.code, error_message=error.message)
        if not reply.error_code:
            slot.retries = 0
            return
        await self._stop_worker(slot, worker)
        iid = slot.instance_id
        if reply.error_code == "NO_CREDENTIALS":
            await self._report(self.events.disconnected(iid, LOGOUT, reply.error_message))
            return
        reason = TIMEOUT if reply.error_code == "DIAL_TIMEOUT" else NETWORK
        delay = self._backoff(slot.retries)
        slot.retries += 1
        await self._report(
            self.events.disconnected(
                iid, reason, f"{reply.error_message}; retrying in {delay:g} s", reply.error_code
            )
        )
        self._schedule_restart(slot, delay)

    async def _dial(self, worker: _Worker, command: Command) -> Event.Reply:
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

    async def pair_phone(self, instance_id: str, phone_number: str) -> str:
        slot = self._slot(instance_id)
        command = Command(pair_phone=Command.PairPhone(phone_number=phone_number))
        reply = await self._command(slot, command, "NOT_PAIRING", "no pairing is under way")
        return reply.linking_code

    async def stop_pairing(self, instance_id: str) -> None:
        slot = self._slots.get(instance_id)
        if slot is not None and slot.mode == "pair" and not slot.paired:
            self._cancel_restart(slot)
            await self._stop_worker(slot)

    async def send(self, instance_id: str, to: str, text: str) -> str:
        slot = self._slot(instance_id)
        command = Command(send_text=Command.SendText(to=to, text=text))
        reply = await self._command(slot, command, "NOT_CONNECTED", "the device is not connected")
        return reply.message_id

    async def logout(self, instance_id: str) -> None:
        slot = self._slots.pop(instance_id, None)
        try:
            if slot is not None:
                self._cancel_restart(slot)
                worker = slot.worker
                if worker is not None and worker.alive:
                    with contextlib.suppress(WorkerGone, TimeoutError):
                        await worker.call(Command(logout=Command.Logout()), 10.0)
                await self._stop_worker(slot)
        finally:
            self._wipe_credentials(instance_id)

    def _wipe_credentials(self, instance_id: str) -> None:
        shutil.rmtree(self.device_dir(instance_id), ignore_errors=True)

    async def close(self) -> None:
        self._closed = True
        for slot in self._slots.values():
            self._cancel_restart(slot)
        await asyncio.gather(*(self._stop_worker(s) for s in self._slots.values()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # Phone: the simulated phone inside simulated workers.

    async def scan(self, instance_id: str, phone_number: str, hold_handshake: bool) -> None:
        await self._phone(
            instance_id,
            Action(action=Action.ACTION_SCAN, phone_number=phone_number, hold=hold_handshake),
        )

    async def complete_handshake(self, instance_id: str) -> None:
        await self._phone(instance_id, Action(action=Action.ACTION_COMPLETE_HANDSHAKE))

    async def drop_network(self, instance_id: str, hold_reconnect: bool) -> None:
        await self._phone(
            instance_id, Action(action=Action.ACTION_DROP_NETWORK, hold=hold_reconnect)
        )

    async def unlink(self, instance_id: str) -> None:
        await self._phone(instance_id, Action(action=Action.ACTION_UNLINK))
        await self.logout(instance_id)

    async def fail(self, instance_id: str, code: str, message: str) -> None:
        await self._phone(
            instance_id, Action(action=Action.ACTION_FAIL, code=code, message=message)
        )

    async def inject_fault(self, instance_id: str, fault: str) -> None:
        if fault == "pairing":
            # The next pairing starts a new worker: the fault is armed when it spawns.
            self._pairing_faults.add(instance_id)
            return
        await self._phone(instance_id, Action(action=Action.ACTION_FAULT_SEND))

    async def _phone(self, instance_id: str, action: Action) -> None:
        slot = self._slot(instance_id)
        worker = slot.worker
        if worker is None or not worker.alive:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_INVALID_TRANSITION,
                f"session {instance_id!r} has no running engine worker",
                instance_id=instance_id,
            )
        worker.rejected = None
        await self._command(slot, Command(simulate_phone=action), "NOT_RUNNING", "no worker runs")
        if worker.rejected is not None:
            raise worker.rejected

    # Commands.

    async def _command(
        self, slot: _Slot, command: Command, missing_code: str, missing_message: str
    ) -> Event.Reply:
        worker = slot.worker
        if worker is None or not worker.alive:
            raise EngineError(missing_code, missing_message)
        try:
            reply = await worker.call(command, self._options.command_timeout)
        except TimeoutError:
            raise EngineError(
                "ENGINE_TIMEOUT",
                f"the engine did not answer within {self._options.command_timeout:g} s",
            ) from None
        except WorkerGone:
            raise EngineError("WORKER_GONE", "the engine worker exited during the call") from None
        if reply.error_code:
            raise EngineError(reply.error_code, reply.error_message)
        return reply

    # Processes.

    def _slot(self, instance_id: str) -> _Slot:
        slot = self._slots.get(instance_id)
        if slot is None:
            slot = self._slots[instance_id] = _Slot(instance_id)
        return slot

    async def _spawn(self, slot: _Slot) -> _Worker:
        if self._closed:
            raise EngineError("SHUTTING_DOWN", "the Session Manager is shutting down")
        options, iid = self._options, slot.instance_id
        device_dir = self.device_dir(iid)
        device_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [
            "-m",
            "service.engine.worker",
            "--engine",
            options.engine,
            "--instance-id",
            iid,
            "--device-dir",
            str(device_dir),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            options.log_level,
            *options.worker_args,
        ]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C on the terminal is for the server alone
        )
        worker = _Worker(process)
        slot.worker = worker
        worker.tasks = [
            asyncio.create_task(self._read(slot, worker)),
            asyncio.create_task(self._log_stderr(iid, worker)),
            asyncio.create_task(self._heartbeat(worker)),
        ]
        if iid in self._pairing_faults and slot.mode == "pair":
            self._pairing_faults.discard(iid)
            await worker.call(
                Command(simulate_phone=Action(action=Action.ACTION_FAULT_PAIRING)),
                self._options.command_timeout,
            )
        log.info("worker %d started (%s)", process.pid, slot.mode, extra={"instance_id": iid})
        return worker

    async def _stop_worker(self, slot: _Slot, worker: _Worker | None = None) -> None:
        worker = worker or slot.worker
        if worker is None:
            return
        if slot.worker is worker:
            slot.worker = None
        worker.stopping = True
        if worker.alive:
            with contextlib.suppress(WorkerGone, TimeoutError, ProtocolError):
                await worker.call(Command(stop=Command.Stop()), self._options.stop_timeout)
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), self._options.stop_timeout)
            except TimeoutError:
                worker.kill("STOPPED", "stopped by the Session Manager")
                await asyncio.shield(worker.exited)

    async def _read(self, slot: _Slot, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        try:
            while (frame := await read_frame(stdout)) is not None:
                event = Event.FromString(frame)
                if event.WhichOneof("event") == "reply":
                    reply = worker.pending.get(event.reply.id)
                    if reply is not None and not reply.done():
                        reply.set_result(event.reply)
                elif not worker.stopping:
                    await self._relay(slot, worker, event)
        except (ProtocolError, ValueError) as error:
            log.error("worker wrote garbage: %s", error, extra={"instance_id": slot.instance_id})
            worker.kill("WORKER_PROTOCOL_ERROR", f"the engine worker broke the protocol: {error}")
        returncode = await worker.process.wait()
        for reply in worker.pending.values():
            if not reply.done():
                reply.set_exception(WorkerGone(describe_exit(returncode)))
        worker.exited.set_result(returncode)
        for task in worker.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if slot.worker is worker:
            slot.worker = None
        if not worker.stopping and not self._closed:
            await self._exited(slot, worker, returncode)

    async def _relay(self, slot: _Slot, worker: _Worker, event: Event) -> None:
        """Hand one report to the Session Manager, in the order it came."""
        iid, events = slot.instance_id, self.events
        kind = event.WhichOneof("event")
        try:
            if kind == "qr_code":
                valid_for = event.qr_code.valid_for.ToTimedelta()
                await events.qr_code(iid, event.qr_code.code, self._clock.now() + valid_for)
            elif kind == "qr_scanned":
                slot.paired = True
                await events.qr_scanned(iid)
            elif kind == "reconnecting":
                await events.reconnecting(iid)
            elif kind == "connected":
                slot.paired, slot.retries = True, 0
                slot.phone_number = event.connected.phone_number
                await events.connected(iid, event.connected.phone_number)
            elif kind == "disconnected":
                d = event.disconnected
                if d.reason == LOGOUT:  # unlinked: the stored device is worthless
                    slot.paired = False
                    self._wipe_credentials(iid)
                await events.disconnected(iid, d.reason, d.message, d.code or None)
            elif kind == "failed":
                await events.failed(iid, event.failed.code, event.failed.message)
            elif kind == "pairing_failed":
                p = event.pairing_failed
                await events.pairing_failed(iid, p.code, p.message)
        except errors.ContractError as error:
            worker.rejected = error
            log.info("report %s refused: %s", kind, error.message, extra={"instance_id": iid})

    async def _exited(self, slot: _Slot, worker: _Worker, returncode: int) -> None:
        iid = slot.instance_id
        if slot.paired:
            slot.mode = "connect"  # whatever comes next reconnects the paired device
        if returncode == EXIT_DONE:
            log.info("worker finished", extra={"instance_id": iid})
            return
        if returncode == EXIT_RETRY:
            if slot.paired:
                self._schedule_restart(slot, self._backoff(slot.retries))
                slot.retries += 1
            return
        code, message = self._exit_cause(worker)
        log.warning("%s: %s", code, message, extra={"instance_id": iid})
        now = asyncio.get_running_loop().time()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self._options.crash_window:
            slot.crashes.popleft()
        if len(slot.crashes) >= self._options.crash_limit:
            await self._report(
                self.events.failed(
                    iid,
                    "WORKER_CRASH_LOOP",
                    f"The engine worker failed {len(slot.crashes)} times within "
                    f"{self._options.crash_window:g} s (last: {message}); it is not restarted. "
                    "Request a new QR code, or restart the server, to try again",
                )
            )
            return
        delay = self._backoff(len(slot.crashes) - 1)
        if slot.paired:
            await self._report(
                self.events.disconnected(iid, UNKNOWN, f"{message}; restarting it", code)
            )
        else:
            await self._report(
                self.events.pairing_failed(iid, code, f"{message}; a new QR code follows")
            )
        self._schedule_restart(slot, delay)

    def _exit_cause(self, worker: _Worker) -> tuple[str, str]:
        if worker.killed_for is not None:
            return worker.killed_for
        returncode = worker.exited.result() if worker.exited.done() else -1
        return (
            "WORKER_CRASHED",
            f"The engine worker exited unexpectedly ({describe_exit(returncode)})",
        )

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
        if self._closed or self._slots.get(slot.instance_id) is not slot:
            return
        if self._metrics is not None:
            self._metrics.worker_restarts.inc()
        log.info("restarting the worker (%s)", slot.mode, extra={"instance_id": slot.instance_id})
        if slot.mode == "connect":
            await self._report(self.events.reconnecting(slot.instance_id))
            await self._connect(slot)
            return
        try:
            await self._pair(slot)
        except EngineError as error:
            failed = self.events.pairing_failed(slot.instance_id, error.code, error.message)
            await self._report(failed)

    def _backoff(self, attempt: int) -> float:
        options = self._options
        return float(min(options.restart_max, options.restart_initial * 2 ** max(attempt, 0)))

    async def _heartbeat(self, worker: _Worker) -> None:
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

    async def _log_stderr(self, instance_id: str, worker: _Worker) -> None:
        stderr = worker.process.stderr
        assert stderr is not None
        while line := await stderr.readline():
            text = line.decode(errors="replace").rstrip()[:1000]
            if text:
                log.info("worker: %s", text, extra={"instance_id": instance_id})

    async def _report(self, report: Coroutine[Any, Any, object]) -> None:
        try:
            await report
        except errors.ContractError as error:  # the session was deleted or moved on
            log.info("report refused: %s", error.message)

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
