"""An engine worker: one session's WhatsApp connection in a process of its own.

The Session Manager starts it (``python -m service.engine.worker``) and talks to it
over the worker protocol (``worker_protocol``): commands on standard input,
reports and replies on standard output. Anything else the engine prints goes
to standard error, which the server logs. The worker dies with its parent,
ends when its standard input closes, and never outlives the server.

While its node holds the session's lease, the server sends ``Hold`` commands;
the worker's ``LeaseSwitch`` ends the process the moment the latest deadline
passes on ``CLOCK_BOOTTIME`` (which counts on while the machine is
suspended), or a Hold names another lease epoch than the one the worker was
started for, so a server that is frozen or cut off from the database cannot
keep it connected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from service.clock import SystemClock, boottime
from service.domain.contract import DELIVERED, FAILED, READ
from service.domain.states import EngineEvent, SessionRef
from service.engine.credentials import LOCATION_VARIABLE, DeviceStore, device_store
from service.engine.port import Engine, EngineError, Report
from service.engine.protocol import (
    EXIT_DONE,
    EXIT_LEASE_EXPIRED,
    Command,
    Event,
    ProtocolError,
    encode,
    failure_reply,
    read_frame,
    report_frame,
)
from service.engine.simulated import PairingTimes, SimulatedEngine

log = logging.getLogger("service.engine.worker")

Action = Command.SimulatePhone
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the server dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(EXIT_DONE)


class LeaseSwitch:
    """The dead-man's switch: ends the process when the latest Hold's deadline passes.

    A thread of its own waits for the deadline, so that nothing the event loop
    is busy with can delay it; it ends the process with ``os._exit``: no
    graceful close, no more writes to WhatsApp or to the credentials. It waits
    in slices of at most ``SLICE`` seconds, because a timed wait counts on the
    monotonic clock, which stands still while the machine is suspended: after
    a resume the deadline is read again at once.
    """

    SLICE = 0.5

    def __init__(self, epoch: int = 0) -> None:
        #: The lease epoch this worker was started for (0: none).
        self._epoch = epoch
        self._until = math.inf
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, until: float, epoch: int = 0) -> None:
        """Move the deadline to ``until`` (CLOCK_BOOTTIME seconds; +inf lifts it).

        A Hold of another epoch belongs to another lease: the deadline passes now.
        """
        if epoch and self._epoch and epoch != self._epoch:
            until = -math.inf
        with self._changed:
            self._until = until
            if self._thread is None:
                self._thread = threading.Thread(target=self._wait, name="lease", daemon=True)
                self._thread.start()
            self._changed.notify()

    def expired(self) -> bool:
        return not self._until > boottime()  # a NaN deadline counts as passed

    def check(self) -> None:
        """End the process now if the deadline has passed (before acting on a command)."""
        if self.expired():
            os._exit(EXIT_LEASE_EXPIRED)

    def _wait(self) -> None:
        with self._changed:
            while True:
                remaining = self._until - boottime()
                if not remaining > 0:  # NaN too: a deadline that cannot be read has passed
                    os._exit(EXIT_LEASE_EXPIRED)
                self._changed.wait(min(remaining, self.SLICE) if math.isfinite(remaining) else None)


class PipeReports:
    """The worker engine's ``Report``: each report becomes a frame on standard output."""

    def __init__(self, write: Callable[[Event], None], clock: SystemClock) -> None:
        self._write = write
        self._clock = clock

    async def __call__(self, session: SessionRef, event: EngineEvent) -> None:
        self._write(report_frame(event, self._clock.now()))


class Worker:
    def __init__(self, args: argparse.Namespace, out_fd: int) -> None:
        self._session = SessionRef(args.instance_id, args.session_id)
        self._out_fd = out_fd
        self._ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._lease = LeaseSwitch(args.epoch)
        clock = SystemClock()
        devices = device_store(args.credentials)
        self.engine = self._engine(args, devices, PipeReports(self.write, clock), clock)
        self._tasks: set[asyncio.Task[None]] = set()

    def _engine(
        self, args: argparse.Namespace, devices: DeviceStore, report: Report, clock: SystemClock
    ) -> Engine:
        if args.engine == "whatsmeow":
            from service.engine.whatsmeow import WhatsmeowEngine

            return WhatsmeowEngine(devices, report, clock, self.end)
        times = PairingTimes(first=args.qr_first, rotation=args.qr_rotation, codes=args.qr_codes)
        # Each worker's codes differ from those of the worker before it.
        return SimulatedEngine(
            report, clock, times, first_serial=time.time_ns() // 1000, devices=devices
        )

    def write(self, event: Event) -> None:
        view = memoryview(encode(event))
        while view:
            view = view[os.write(self._out_fd, view) :]

    def end(self, status: int) -> None:
        if not self._ended.done():
            self._ended.set_result(status)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
        )
        commands = asyncio.create_task(self._read_commands(reader))
        status = await self._ended
        commands.cancel()
        return status

    async def _read_commands(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                command = Command.FromString(frame)
                if command.WhichOneof("command") == "hold":
                    hold = command.hold
                    self._lease.hold(hold.until, hold.epoch)  # in order, and with no reply
                    continue
                self._lease.check()
                task = asyncio.create_task(self._handle(command))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except ProtocolError as error:
            log.error("bad command stream: %s", error)
        self.end(EXIT_DONE)  # the server closed our input: it is gone or done with us

    async def _handle(self, command: Command) -> None:
        reply = Event.Reply(id=command.id)
        try:
            await self._run(command, reply)
        except EngineError as error:
            reply = failure_reply(command.id, error)
        except Exception as error:
            log.exception("command %s failed", command.WhichOneof("command"))
            unknown = command.WhichOneof("command") == "send_text"  # it may have gone out
            reply = failure_reply(
                command.id, EngineError("WORKER_ERROR", repr(error), definite=not unknown)
            )
        self.write(Event(reply=reply))
        if command.WhichOneof("command") == "stop":
            self.end(EXIT_DONE)

    async def _run(self, command: Command, reply: Event.Reply) -> None:
        session, engine = self._session, self.engine
        match command.WhichOneof("command"):
            case "start_pairing":
                await engine.start_pairing(session)
            case "restore":
                await engine.restore(session, command.restore.phone_number or None)
            case "pair_phone":
                reply.linking_code = await engine.pair_phone(
                    session, command.pair_phone.phone_number
                )
            case "send_text":
                send = command.send_text
                reply.message_id = await engine.send(session, send.to, send.text)
            case "logout":
                await engine.logout(session)
            case "stop":
                await engine.close()
            case "ping":
                pass
            case "simulate_phone":
                await self._simulate(command.simulate_phone)
            case other:
                raise EngineError("UNKNOWN_COMMAND", f"unknown command {other!r}")

    async def _simulate(self, action: Action) -> None:
        phone, session = self.engine, self._session
        if not isinstance(phone, SimulatedEngine):
            raise EngineError("NOT_SIMULATED", "this worker runs a real engine")
        match action.action:
            case Action.ACTION_SCAN:
                await phone.scan(session, action.phone_number, action.hold)
            case Action.ACTION_COMPLETE_HANDSHAKE:
                await phone.complete_handshake(session)
            case Action.ACTION_DROP_NETWORK:
                await phone.drop_network(session, action.hold)
            case Action.ACTION_UNLINK:
                await phone.unlink(session)
            case Action.ACTION_FAIL:
                await phone.fail(session, action.code, action.message)
            case Action.ACTION_FAULT_PAIRING:
                await phone.inject_fault(session, "pairing")
            case Action.ACTION_FAULT_SEND:
                await phone.inject_fault(session, "send")
            case Action.ACTION_DELIVER:
                await phone.receipt(session, action.message_id, DELIVERED)
            case Action.ACTION_READ:
                await phone.receipt(session, action.message_id, READ)
            case Action.ACTION_FAIL_MESSAGE:
                await phone.receipt(session, action.message_id, FAILED, action.code, action.message)
            case _:
                raise EngineError("UNKNOWN_ACTION", f"unknown phone action {action.action}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.engine.worker")
    parser.add_argument("--engine", choices=("whatsmeow", "simulated"), required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--session-id", type=int, required=True)
    parser.add_argument(
        "--credentials",
        default=os.environ.get(LOCATION_VARIABLE),
        help="where the credentials live: a folder, or a postgresql:// URL with its schema "
        f"(default: ${LOCATION_VARIABLE})",
    )
    parser.add_argument(
        "--epoch", type=int, default=0, help="the lease epoch it runs under (0: none)"
    )
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--qr-first", type=float, default=60.0)
    parser.add_argument("--qr-rotation", type=float, default=20.0)
    parser.add_argument("--qr-codes", type=int, default=6)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.credentials:
        sys.exit(f"no credential location: set {LOCATION_VARIABLE} or pass --credentials")
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    out_fd = os.dup(1)
    os.dup2(2, 1)  # standard output belongs to the protocol; stray prints go to stderr
    sys.stdout = sys.stderr
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )

    async def run() -> int:
        return await Worker(args, out_fd).run()

    status = asyncio.run(run())
    sys.stderr.flush()
    os._exit(status)  # neonize's connection thread is not a daemon: do not wait for it


if __name__ == "__main__":
    main()
