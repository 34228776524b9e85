"""Watchers that never read cost bounded memory and hold back nobody.

The server runs as a subprocess so that its own memory can be measured: 1,000
WatchSession streams that never read stay open while hundreds of changes are
committed; a watcher that reads must still see every change through to the
latest, and the server's memory must stay within a bound per stalled watcher.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from sessionmanager.v1 import session_pb2, session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.servers import ServerProcess
from tests.status_details import next_state

STALLED = 1_000
CYCLES = 60  # each DropNetwork cycle commits three changes
MAX_BYTES_PER_STALLED_WATCHER = 64 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_stalled_watchers_stay_bounded(tmp_path: Path) -> None:
    with ServerProcess.start(  # before any load
        tmp_path / "db.sqlite", f"--max-watchers-per-session={STALLED + 10}", "--log-level=warning"
    ) as server:
        target = server.address
        async with (
            grpc.aio.insecure_channel(target) as control,
            grpc.aio.insecure_channel(target) as stalled_channel,
        ):
            sessions = session_service_pb2_grpc.SessionServiceStub(control)
            phone = simulator_service_pb2_grpc.SimulatorServiceStub(control)
            await sessions.CreateSession(pb.CreateSessionRequest(instance_id="busy"))
            await sessions.RequestQR(pb.RequestQRRequest(instance_id="busy"))
            await phone.ScanQR(sim.ScanQRRequest(instance_id="busy"))

            stalled_stub = session_service_pb2_grpc.SessionServiceStub(stalled_channel)
            stalled = [
                stalled_stub.WatchSession(pb.WatchSessionRequest(instance_id="busy"))
                for _ in range(STALLED)
            ]
            for call in stalled:  # each got its first state; none reads again
                await call.read()
            baseline = _rss(server.pid)

            active = sessions.WatchSession(pb.WatchSessionRequest(instance_id="busy"))
            first_state = await next_state(active)
            started = time.monotonic()
            for _ in range(CYCLES):
                await phone.DropNetwork(sim.DropNetworkRequest(instance_id="busy"))
            latest = (await sessions.GetSession(pb.GetSessionRequest(instance_id="busy"))).session
            assert latest.revision == first_state.revision + 3 * CYCLES

            seen = [first_state.revision]
            while seen[-1] < latest.revision:
                state = await asyncio.wait_for(next_state(active), timeout=30)
                seen.append(state.revision)
            elapsed = time.monotonic() - started
            assert seen == sorted(set(seen))
            assert seen[-1] == latest.revision
            assert latest.status == session_pb2.SESSION_STATUS_CONNECTED

            grown = _rss(server.pid) - baseline
            print(
                f"{STALLED} stalled watchers, {3 * CYCLES} changes in {elapsed:.1f} s; "
                f"server memory grew {grown / 1024:.0f} KiB "
                f"({grown / STALLED:.0f} B per stalled watcher)"
            )
            assert grown < STALLED * MAX_BYTES_PER_STALLED_WATCHER
            for call in [*stalled, active]:
                call.cancel()
        assert server.stop() == 0
