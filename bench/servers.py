"""The servers under measurement, each in its own process, and the client calls that load them.

``real`` starts the Session Manager (``session-manager serve``, simulated engine,
limits lifted), ``bare`` the baseline (``bench/bare.py``). Calls pass requests
and responses as bytes, so the client costs the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from google.protobuf.message import Message

from bench.cpu import cpu_seconds
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim

BIN = Path(sys.executable).parent
SESSIONS = "/sessionmanager.v1.SessionService"


def identity(value: bytes) -> bytes:
    """Requests and responses travel as bytes: no (de)serialization in the client."""
    return value


@dataclass
class Server:
    """A server process, the address it listens on, and its log (stderr, kept out of the report)."""

    process: subprocess.Popen[str]
    address: str
    #: Seconds from the process's start to its "listening" line (serving).
    started_in: float
    #: The process's CPU seconds (all its threads) by then.
    cpu_when_started: float
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _last_line(log: IO[bytes]) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def _launch(*commands: list[str]) -> list[Server]:
    """Start every command at once, then wait for each to print the port it listens on."""
    started = time.perf_counter()
    logs = [tempfile.TemporaryFile() for _ in commands]  # noqa: SIM115 (closed by Server.stop)
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        for command, log in zip(commands, logs, strict=True)
    ]
    servers = []
    for command, process, log in zip(commands, processes, logs, strict=True):
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening on port" not in line:
            for other in processes:
                other.kill()
                other.wait()
            raise RuntimeError(f"{command[0]} did not start: {_last_line(log)}")
        port = line.rsplit(" ", 1)[1].strip()
        took = time.perf_counter() - started
        servers.append(Server(process, f"127.0.0.1:{port}", took, cpu_seconds(process.pid), log))
    return servers


def _real_command(database: Path, *flags: str) -> list[str]:
    return [str(BIN / "session-manager"), "serve", "--address=127.0.0.1:0", f"--database={database}", "--engine=simulated",
            "--log-level=warning", "--send-rate=0", "--qr-first-seconds=86400", "--http-address=",
            "--max-watchers-per-session=100000", "--max-watchers=100000", *flags]  # fmt: skip


BARE_COMMAND = [sys.executable, "-m", "bench.bare"]


def real_command(database: Path, *flags: str) -> list[str]:
    """The command line of the Session Manager as the benchmarks run it (see ``real``)."""
    return _real_command(database, *flags)


def launch(command: list[str]) -> Server:
    """Start a server ``command`` that prints its listening line, as ``real`` and ``bare`` do."""
    return _launch(command)[0]


def real(database: Path, *flags: str) -> Server:
    """The Session Manager on ``database``: simulated engine, no rate limit, QR codes valid a day."""
    return _launch(_real_command(database, *flags))[0]


def bare() -> Server:
    """The baseline: a bare grpc.aio server (no-op unary, no-op fan-out)."""
    return _launch(BARE_COMMAND)[0]


@contextlib.contextmanager
def running_pair(database: Path) -> Iterator[tuple[Server, Server]]:
    """The baseline and the Session Manager on ``database``, started together."""
    base, sm = _launch(BARE_COMMAND, _real_command(database))
    with contextlib.ExitStack() as stopping:
        stopping.callback(sm.stop)
        stopping.callback(base.stop)
        yield base, sm


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


async def unary(address: str, method: str, payload: bytes) -> bytes:
    """One call on a channel of its own."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, identity, identity)
        return bytes(await call(payload, timeout=30))


async def prepare(
    address: str, count: int, connect: bool, qr: bool, prefix: str = "load"
) -> list[str]:
    """Create ``count`` sessions, each with a valid QR code (``qr``) or connected (``connect``)."""
    ids = [f"{prefix}_{n}" for n in range(count)]
    async with grpc.aio.insecure_channel(address) as channel:

        async def call(method: str, request: Message) -> None:
            await channel.unary_unary(method, identity, identity)(
                request.SerializeToString(), timeout=30
            )

        async def one(iid: str) -> None:
            await call(f"{SESSIONS}/CreateSession", pb.CreateSessionRequest(instance_id=iid))
            if qr or connect:
                await call(f"{SESSIONS}/RequestQR", pb.RequestQRRequest(instance_id=iid))
            if connect:
                await call(
                    "/sessionmanager.v1.SimulatorService/ScanQR", sim.ScanQRRequest(instance_id=iid)
                )

        await asyncio.gather(*(one(iid) for iid in ids))
    return ids


@contextlib.asynccontextmanager
async def watching(
    address: str, method: str, payload: bytes, watchers: int
) -> AsyncIterator[list[grpc.aio.UnaryStreamCall[bytes, bytes]]]:
    """``watchers`` open streams over 8 channels, each past its first message (the current state)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    try:
        streams = [
            channels[n % len(channels)].unary_stream(method, identity, identity)(payload)
            for n in range(watchers)
        ]
        await read_one_each(streams)
        yield streams
        for stream in streams:
            stream.cancel()
    finally:
        for channel in channels:
            await channel.close(None)


async def read_one_each(streams: list[grpc.aio.UnaryStreamCall[bytes, bytes]]) -> None:
    """Wait until every stream has delivered its next message."""
    messages = await asyncio.gather(*(stream.read() for stream in streams))
    if not all(isinstance(message, bytes) for message in messages):  # grpc.aio.EOF
        raise RuntimeError("a watch stream ended")
