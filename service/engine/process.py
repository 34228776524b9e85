"""One engine worker process: its pipes, its calls and its reports.

``WorkerProcess`` starts ``python -m service.engine.worker`` for one session
incarnation, sends it commands and matches their replies, hands each report to
the supervisor in the order the worker wrote them, logs its standard error,
and notices its exit the moment its output pipe closes. It knows nothing of
restarts or policies: that is the supervisor's job.

Reports are relayed by a task of their own, so that a report whose commit
takes long (a storage outage the supervisor waits out) never keeps a reply or
a heartbeat from being read. A caller that needs what its command made the
worker report (a pairing's first code, a simulated phone's action) asks for
the reply ``after_reports``: it comes once every report written before it was
relayed, or as soon as one of them could not be stored (``unstored``).

Nothing here dies of what it relays: whatever the supervisor's handling of a
report raises is logged with the session and the worker is killed, so the
supervisor's exit handling says what became of it; ``exited`` is resolved in
every case, and no wait here is without a bound.
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

#: Receives each report of the worker, in order; awaited before the next report is handed over.
OnReport = Callable[["WorkerProcess", EngineEvent], Awaitable[None]]

#: Hold frames are skipped while this much is still unread in the worker's
#: input: a worker that reads nothing is frozen, and its heartbeat ends it.
HOLD_BACKLOG_BYTES = 64 * 1024
#: More reports waiting to be relayed than any worker writes while a commit is
#: retried: past this the worker is killed rather than buffered without bound.
REPORT_BACKLOG = 1000
#: How long a worker whose output closed may take to exit, before and after SIGKILL.
REAP_TIMEOUT = 5.0


class WorkerGone(Exception):
    """The worker exited before it answered.

    ``delivered`` says whether the command may have reached it: a command that
    could not even be written to its input surely did not.
    """

    def __init__(self, message: str, *, delivered: bool) -> None:
        super().__init__(message)
        self.delivered = delivered


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
        #: Each call waiting for its reply, which comes with how many reports preceded it.
        self._pending: dict[int, asyncio.Future[tuple[Reply, int]]] = {}
        self._ids = itertools.count(1)
        #: The supervisor is stopping it on purpose: its exit is not a crash, its reports are
        #: not relayed any more.
        self.stopping = False
        #: Why the supervisor killed it, as (code, message), if it did.
        self.killed_for: tuple[str, str] | None = None
        #: The last report the domain refused (for the simulated phone's commands).
        self.refused: errors.ContractError | None = None
        #: Why the report being relayed could not be stored, while the supervisor retries it.
        self.unstored: Exception | None = None
        #: The supervisor gave up on a report: the reports queued after it are dropped.
        self.reports_lost = False
        self._reports: asyncio.Queue[EngineEvent | None] = asyncio.Queue()
        self._reports_read = 0
        self._reports_relayed = 0
        self._progress = asyncio.Event()
        self._ending = asyncio.Event()
        self._output_closed = False
        #: Its exit status, once it has exited and every report it wrote was handled.
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._relay = asyncio.create_task(self._relay_reports())
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._log_stderr())]

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
        """Whether the process runs: its output is open and it has not been reaped."""
        return not self._output_closed and not self.exited.done()

    def exit_cause(self) -> tuple[str, str]:
        """Why it ended, as a ``last_error_code`` and a sentence."""
        if self.killed_for is not None:
            return self.killed_for
        if not self.exited.done():  # its pipes closed first; the exit status is not known yet
            return ("WORKER_CRASHED", "The engine worker stopped answering unexpectedly")
        return (
            "WORKER_CRASHED",
            f"The engine worker exited unexpectedly ({describe_exit(self.exited.result())})",
        )

    # Commands.

    async def call(self, command: Command, within: float, *, after_reports: bool = False) -> Reply:
        """Send ``command``; its reply, TimeoutError after ``within`` seconds, or WorkerGone.

        With ``after_reports`` the reply is returned once every report the
        worker wrote before it has been relayed, or sooner if one of them could
        not be stored (``unstored`` then says why).
        """
        stdin = self._process.stdin
        if not self.alive or stdin is None or stdin.is_closing():
            raise WorkerGone("the worker has exited", delivered=False)
        command.id = next(self._ids)
        answer: asyncio.Future[tuple[Reply, int]] = asyncio.get_running_loop().create_future()
        self._pending[command.id] = answer
        try:
            async with asyncio.timeout(within):
                try:
                    stdin.write(encode(command))
                    await stdin.drain()
                except (BrokenPipeError, ConnectionResetError) as error:
                    raise WorkerGone("the worker has exited", delivered=False) from error
                reply, reports_before = await asyncio.shield(answer)
                if after_reports:
                    await self._relayed(reports_before)
                return reply
        finally:
            self._pending.pop(command.id, None)

    def hold(self, until: float | None, epoch: int) -> None:
        """Send ``Hold``: fire and forget, never waits (see ``Engine.hold``)."""
        stdin = self._process.stdin
        if not self.alive or stdin is None or stdin.is_closing():
            return
        if stdin.transport.get_write_buffer_size() > HOLD_BACKLOG_BYTES:
            return
        hold = Command.Hold(until=math.inf if until is None else until, epoch=epoch)
        with contextlib.suppress(OSError):
            stdin.write(encode(Command(hold=hold)))

    # Ending it.

    def kill(self, code: str, message: str) -> None:
        """SIGKILL it now (if it still runs), remembering why."""
        if self.exited.done():
            return
        self.killed_for = self.killed_for or (code, message)
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def mark_stopping(self) -> None:
        """From now on its reports are not relayed and its exit is no crash."""
        self.stopping = True
        self._ending.set()
        self._progress.set()

    def give_up_reports(self, code: str, message: str) -> None:
        """A report of it is lost: kill it, and drop the reports it wrote after that one."""
        self.reports_lost = True
        self._ending.set()
        self._progress.set()
        self.kill(code, message)

    async def stop(self, within: float) -> None:
        """Ask it to stop; kill it if it has not exited ``within`` seconds later.

        Waits at most ``within`` again for the exit after the kill, and logs it
        when even that did not end it.
        """
        self.mark_stopping()
        if self.alive:
            with contextlib.suppress(WorkerGone, TimeoutError, ProtocolError):
                await self.call(Command(stop=Command.Stop()), within)
        if await self.wait_exit(within) is not None:
            return
        log.warning(
            "worker %d did not stop within %g s: killing it", self.pid, within, extra=self._about()
        )
        self.kill("STOPPED", "stopped by the Session Manager")
        if await self.wait_exit(within) is not None:
            return
        if self._process.returncode is None:
            why = f"did not end within {within:g} s of SIGKILL"
        else:  # a commit of one of its reports hangs
            why = f"ended, but its reports were still being stored {within:g} s later"
        log.error("worker %d %s; leaving it", self.pid, why, extra=self._about())

    async def wait_exit(self, within: float) -> int | None:
        """Its exit status, or None if it has not exited within ``within`` seconds."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), within)
        except TimeoutError:
            return None

    async def idle(self, seconds: float) -> None:
        """Wait ``seconds``, or less once it is being stopped, given up on, or has ended."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ending.wait(), seconds)

    def note_unstored(self, error: Exception | None) -> None:
        """The report being relayed could not be stored (``error``), or now was (None)."""
        self.unstored = error
        self._progress.set()

    async def report_settled(self) -> Exception | None:
        """Once the report being retried is stored: None; or, once it is lost (its worker
        given up on, or ended), why it could not be stored."""
        while self.unstored is not None and not self.reports_lost and not self.exited.done():
            self._progress.clear()
            await self._progress.wait()
        return self.unstored

    # Reading and relaying.

    async def _run(self) -> None:
        returncode = -1
        try:
            await self._read()
        except (ProtocolError, ValueError) as error:  # protobuf's DecodeError is a ValueError
            log.error("worker wrote garbage: %s", error, extra=self._about())
            self.kill("WORKER_PROTOCOL_ERROR", f"the engine worker broke the protocol: {error}")
        except Exception as error:  # noqa: BLE001 - the reader must end in _settle, whatever it was
            log.error("reading from the worker failed: %r", error, extra=self._about())
            self.kill("WORKER_PROTOCOL_ERROR", f"the engine worker's output failed: {error!r}")
        finally:
            self._output_closed = True
            self._ending.set()
            self._reports.put_nowait(None)
            try:
                returncode = await self._reap()
                await self._relay
            finally:
                self._settle(returncode)

    async def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        while (frame := await read_frame(stdout)) is not None:
            event = Event.FromString(frame)
            if event.WhichOneof("event") == "reply":
                answer = self._pending.get(event.reply.id)
                if answer is not None and not answer.done():
                    answer.set_result((event.reply, self._reports_read))
                continue
            report = decode_report(event, self._now())
            if self._reports.qsize() >= REPORT_BACKLOG:
                log.error("worker flooded the server with reports", extra=self._about())
                self.give_up_reports(
                    "REPORT_BACKLOG",
                    f"the engine worker wrote more than {REPORT_BACKLOG} reports that could not "
                    "be relayed",
                )
                continue
            self._reports_read += 1
            self._reports.put_nowait(report)

    async def _relay_reports(self) -> None:
        while (report := await self._reports.get()) is not None:
            try:
                if not self.stopping and not self.reports_lost:
                    await self._on_report(self, report)
            except Exception as error:  # noqa: BLE001 - logged, and the worker's exit says it
                log.error(
                    "relaying the worker's %s report failed: %r",
                    type(report).__name__,
                    error,
                    extra=self._about(),
                )
                self.give_up_reports(
                    "REPORT_FAILED",
                    f"a {type(report).__name__} report of the engine worker could not be "
                    f"relayed ({error!r})",
                )
            finally:
                self._reports_relayed += 1
                self._progress.set()

    async def _relayed(self, count: int) -> None:
        """Return once ``count`` reports were relayed, one could not be stored, or it exited."""
        while self._reports_relayed < count and self.unstored is None and not self.exited.done():
            self._progress.clear()
            await self._progress.wait()

    async def _reap(self) -> int:
        """Its exit status; one whose output closed but that goes on running is killed."""
        try:
            return await asyncio.wait_for(self._process.wait(), REAP_TIMEOUT)
        except TimeoutError:
            log.warning(
                "worker %d closed its output but runs on: killing it", self.pid, extra=self._about()
            )
        self.kill("WORKER_HUNG", "the engine worker closed its output but did not exit")
        try:
            return await asyncio.wait_for(self._process.wait(), REAP_TIMEOUT)
        except TimeoutError:
            log.error(
                "worker %d did not end within %g s of SIGKILL", self.pid, REAP_TIMEOUT,
                extra=self._about(),
            )  # fmt: skip
            return -1

    def _settle(self, returncode: int) -> None:
        """It is gone: every call still waiting learns it, and ``exited`` is resolved."""
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(WorkerGone(describe_exit(returncode), delivered=True))
        if not self.exited.done():
            self.exited.set_result(returncode)
        self._progress.set()
        self._ending.set()
        for task in (self._relay, *self._tasks):
            if task is not asyncio.current_task() and not task.done():
                task.cancel()

    async def _log_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        while line := await stderr.readline():
            text = line.decode(errors="replace").rstrip()[:1000]
            if text:
                log.info("worker: %s", text, extra=self._about())

    def _about(self) -> dict[str, str]:
        return {"instance_id": self.session.instance_id}
