"""One engine worker process: its pipes, its calls and its reports.

``WorkerProcess`` starts ``python -m service.engine.worker`` for one session
incarnation, sends it commands and matches their replies, hands each report to
the supervisor in the order the worker wrote them, logs its standard error,
and notices its exit the moment its output pipe closes. It knows nothing of
restarts or policies: that is the supervisor's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

from service.domain import errors
from service.domain.states import EngineEvent, SessionRef
from service.engine.protocol import Command, Event, ProtocolError, Reply, encode, read_frame
from service.engine.protocol import report_of as decode_report

log = logging.getLogger(__name__)

#: Receives each report of the worker, in order; awaited before the next frame is read.
OnReport = Callable[["WorkerProcess", EngineEvent], Awaitable[None]]


#: Hold frames are skipped while this much is still unread in the worker's
#: input: a worker that reads nothing is frozen, and its heartbeat ends it.
HOLD_BACKLOG_BYTES = 64 * 1024


class WorkerGone(Exception):
    """The worker exited before it answered."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class WorkerProcess:
    """A running worker: call it, kill it, await its exit."""

    def __init__(
        self,
        session: SessionRef,
        process: asyncio.subprocess.Process,
        on_report: OnReport,
        now: Callable[[], datetime],
    ) -> None:
        self.session = session
        self._process = process
        self._on_report = on_report
        self._now = now
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        #: The supervisor is stopping it on purpose: its exit is not a crash.
        self.stopping = False
        #: Why the supervisor killed it, as (code, message), if it did.
        self.killed_for: tuple[str, str] | None = None
        #: The last report the domain refused (for the simulated phone's commands).
        self.refused: errors.ContractError | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._log_stderr()),
        ]

    @classmethod
    async def start(
        cls,
        session: SessionRef,
        arguments: Sequence[str],
        on_report: OnReport,
        now: Callable[[], datetime],
        environment: Mapping[str, str] | None = None,
    ) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.engine.worker",
            *arguments,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(environment or {})},
            start_new_session=True,  # a Ctrl-C on the terminal is for the server alone
        )
        return cls(session, process, on_report, now)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_cause(self) -> tuple[str, str]:
        """Why it ended, as a ``last_error_code`` and a sentence."""
        if self.killed_for is not None:
            return self.killed_for
        returncode = self.exited.result() if self.exited.done() else -1
        return (
            "WORKER_CRASHED",
            f"The engine worker exited unexpectedly ({describe_exit(returncode)})",
        )

    async def call(self, command: Command, within: float) -> Reply:
        """Send ``command``; its reply, TimeoutError, or WorkerGone."""
        stdin = self._process.stdin
        if not self.alive or stdin is None:
            raise WorkerGone("the worker has exited")
        command.id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._pending[command.id] = reply
        try:
            stdin.write(encode(command))
            await stdin.drain()
            return await asyncio.wait_for(asyncio.shield(reply), within)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerGone("the worker has exited") from error
        finally:
            self._pending.pop(command.id, None)

    def hold(self, until: float | None) -> None:
        """Send ``Hold``: fire and forget, never waits (see ``Engine.hold_until``)."""
        stdin = self._process.stdin
        if not self.alive or stdin is None or stdin.is_closing():
            return
        if stdin.transport.get_write_buffer_size() > HOLD_BACKLOG_BYTES:
            return
        hold = Command.Hold(until=math.inf if until is None else until)
        with contextlib.suppress(OSError):
            stdin.write(encode(Command(hold=hold)))

    def kill(self, code: str, message: str) -> None:
        if self.alive and self._process.returncode is None:
            self.killed_for = self.killed_for or (code, message)
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def stop(self, within: float) -> None:
        """Ask it to stop; kill it if it has not exited ``within`` seconds later."""
        self.stopping = True
        if self.alive:
            with contextlib.suppress(WorkerGone, TimeoutError, ProtocolError):
                await self.call(Command(stop=Command.Stop()), within)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), within)
            except TimeoutError:
                self.kill("STOPPED", "stopped by the Session Manager")
                await asyncio.shield(self.exited)

    async def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            while (frame := await read_frame(stdout)) is not None:
                event = Event.FromString(frame)
                if event.WhichOneof("event") == "reply":
                    reply = self._pending.get(event.reply.id)
                    if reply is not None and not reply.done():
                        reply.set_result(event.reply)
                elif not self.stopping:
                    await self._on_report(self, decode_report(event, self._now()))
        except (ProtocolError, ValueError) as error:
            log.error("worker wrote garbage: %s", error, extra={"instance_id": self.session})
            self.kill("WORKER_PROTOCOL_ERROR", f"the engine worker broke the protocol: {error}")
        returncode = await self._process.wait()
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(WorkerGone(describe_exit(returncode)))
        self.exited.set_result(returncode)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _log_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        while line := await stderr.readline():
            text = line.decode(errors="replace").rstrip()[:1000]
            if text:
                log.info("worker: %s", text, extra={"instance_id": self.session.instance_id})
