"""One Session Manager server as a subprocess, and what the storage-fault tests ask of it.

``Solo`` wraps a ``ServerProcess`` (tests/servers.py) started with the
simulated engine in worker processes, gRPC and HTTP on port 0, and info logs
(the HTTP port is read from them). It answers the questions every storage-fault
test asks once the fault is over: is a session wedged (does it accept a
change?), does GetSession say what is stored, does health tell the truth,
does SIGTERM end the server within its bound.

``stored`` reads the row itself, never through the server: a callable given
by the test (PostgreSQL or the SQLite file).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.cluster import metadata, reason
from tests.servers import ServerProcess

PHONE = "+5491100000001"
#: Seconds in-flight calls get at SIGTERM, and how long the whole stop may take.
SHUTDOWN_GRACE = 3.0
STOP_BOUND = SHUTDOWN_GRACE + 7.0
CALL_TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STATUS_TEXT = {value: name.removeprefix("SESSION_STATUS_").lower() for name, value in
               s.SessionStatus.items()}  # fmt: skip
_HTTP_PORT = re.compile(r"HTTP API on \S+ \(port (\d+)\)")
#: The log line of a node that took its own old connection for another node's.
FOREIGN_NODE = "give each node its own --node-id"

Stored = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass
class Solo:
    """A running server, its channel and its HTTP port."""

    process: ServerProcess
    channel: grpc.aio.Channel
    http_port: int

    @classmethod
    async def start(cls, database: str | Path, *flags: str) -> Solo:
        process = await asyncio.to_thread(
            ServerProcess.start,
            database,
            "--engine=simulated-worker",
            "--http-address=127.0.0.1:0",
            "--log-level=info",
            "--send-rate=0",
            f"--shutdown-grace={SHUTDOWN_GRACE:g}",
            *flags,
        )
        found = _HTTP_PORT.search(process.stderr())
        assert found, f"no HTTP port in the log: {process.stderr()[-1000:]}"
        channel = grpc.aio.insecure_channel(process.address)
        return cls(process, channel, int(found.group(1)))

    @property
    def sessions(self) -> session_service_pb2_grpc.SessionServiceAsyncStub:
        return session_service_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def simulator(self) -> simulator_service_pb2_grpc.SimulatorServiceAsyncStub:
        return simulator_service_pb2_grpc.SimulatorServiceStub(self.channel)

    def log(self) -> str:
        return self.process.stderr()

    async def close(self) -> None:
        await self.channel.close(None)
        await asyncio.to_thread(self.process.close)

    async def pair(self, iid: str) -> s.WhatsAppSession:
        """Create ``iid``, show a code, let the simulated phone scan it: connected."""
        await self.sessions.CreateSession(
            pb.CreateSessionRequest(instance_id=iid), timeout=CALL_TIMEOUT
        )
        await self.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid), timeout=CALL_TIMEOUT)
        scanned = await self.simulator.ScanQR(
            sim.ScanQRRequest(instance_id=iid, phone_number=PHONE), timeout=CALL_TIMEOUT
        )
        assert scanned.session.status == s.SESSION_STATUS_CONNECTED, scanned.session
        return scanned.session

    async def get(self, iid: str) -> s.WhatsAppSession:
        answer = await self.sessions.GetSession(
            pb.GetSessionRequest(instance_id=iid), timeout=CALL_TIMEOUT
        )
        return answer.session

    async def health(self) -> int:
        """The gRPC health of the whole server."""
        probe = health_pb2_grpc.HealthStub(self.channel)
        answer = await probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        return int(answer.status)

    async def http_health(self) -> tuple[int, str]:
        """``GET /health``: the HTTP status and the body's ``status``."""
        async with httpx.AsyncClient(timeout=CALL_TIMEOUT) as http:
            answer = await http.get(f"http://127.0.0.1:{self.http_port}/health")
        return answer.status_code, str(answer.json().get("status"))

    async def health_is(self, serving: bool) -> str | None:
        """For ``wait_until``: what the gRPC and HTTP health say, unless both say ``serving``."""
        grpc_status = await self.health()
        http_status = await self.http_health()
        expected = (SERVING, (200, "serving")) if serving else (NOT_SERVING, (503, "not_serving"))
        if (grpc_status, http_status) == expected:
            return None
        return f"gRPC health {grpc_status}, GET /health {http_status}; expected {expected}"

    async def matches_store(self, iid: str, stored: Stored) -> str | None:
        """For ``wait_until``: how GetSession differs from the stored row (revision, status)."""
        row = await stored(iid)
        assert row is not None, f"{iid} is not stored"
        shown = await self.get(iid)
        if (shown.revision, STATUS_TEXT[shown.status]) == (row["revision"], row["status"]):
            return None
        return (
            f"GetSession({iid}) says revision {shown.revision} {STATUS_TEXT[shown.status]}, "
            f"the store {row['revision']} {row['status']}"
        )

    def stop_within_bound(self) -> tuple[int, float]:
        """SIGTERM; the exit status and the seconds it took. Fails past ``STOP_BOUND``."""
        started = time.monotonic()
        try:
            code = self.process.stop(STOP_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server did not stop within {STOP_BOUND:g} s of SIGTERM; "
                f"its log ends: {self.log()[-3000:]}"
            ) from None
        return code, time.monotonic() - started


def storage_refusal(error: grpc.aio.AioRpcError) -> str:
    """The ``commit`` of a STORAGE_UNAVAILABLE refusal: ``none`` or ``unknown``; fails the test
    for any other error, or one without the ``commit`` the contract promises."""
    assert reason(error) == "STORAGE_UNAVAILABLE", (
        f"{error.code().name} {reason(error) or '(no reason)'}: {error.details()}"
    )
    commit = metadata(error).get("commit")
    assert commit in ("none", "unknown"), (
        f"STORAGE_UNAVAILABLE without commit none/unknown in its metadata: {metadata(error)}"
    )
    return commit


async def accepts_a_change(solo: Solo, iid: str, stored: Stored, within: float = 15.0) -> str:
    """Make one change to ``iid`` as its stored status allows (connected: a Send; init: a QR
    code; otherwise a Disconnect) and return what was done. A refusal that says the fault is
    still there (STORAGE_UNAVAILABLE, SESSION_MOVING) is tried again for ``within`` seconds;
    any other failure (an INTERNAL StaleRevision: a wedged session) fails at once."""
    deadline = time.monotonic() + within
    attempt = 0
    while True:
        attempt += 1
        row = await stored(iid)
        assert row is not None, f"{iid} is not stored"
        try:
            if row["status"] == "connected":
                key = f"change-{iid}-{time.monotonic_ns()}"
                sent = await solo.sessions.Send(
                    pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key),
                    timeout=CALL_TIMEOUT,
                )
                assert sent.status == pb.MESSAGE_STATUS_SENT, sent
                return f"sent {key}"
            if row["status"] == "init":
                await solo.sessions.RequestQR(
                    pb.RequestQRRequest(instance_id=iid), timeout=CALL_TIMEOUT
                )
                return "showed a code"
            await solo.sessions.Disconnect(
                pb.DisconnectRequest(instance_id=iid), timeout=CALL_TIMEOUT
            )
            return "disconnected"
        except grpc.aio.AioRpcError as error:
            if reason(error) not in ("STORAGE_UNAVAILABLE", "SESSION_MOVING"):
                raise AssertionError(
                    f"{iid} ({row['status']}, revision {row['revision']}) refused a change "
                    f"(attempt {attempt}): {error.code().name} {reason(error)}: {error.details()}"
                ) from None
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{iid} accepted no change within {within:g} s: {error.details()}"
                ) from None
        await asyncio.sleep(0.2)  # the fault's own pace; bounded by ``within``
