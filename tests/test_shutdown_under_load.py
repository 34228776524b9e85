"""SIGTERM while clients call and watch: in-flight calls complete, streams end
with UNAVAILABLE, the process exits 0 and the database is intact."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

import grpc

from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from tests.servers import ServerProcess
from tests.status_details import next_state

CALLERS = 8
WATCHERS = 20
LOAD = 10 * CALLERS  # creates acknowledged before SIGTERM


async def test_sigterm_under_load(tmp_path: Path) -> None:
    database = tmp_path / "sessions.db"
    created: list[str] = []
    outcomes: list[grpc.StatusCode] = []
    loaded = asyncio.Event()

    with ServerProcess.start(database, "--log-level=warning") as server:  # before any load
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(instance_id="watched"))
            watches = [
                stub.WatchSession(pb.WatchSessionRequest(instance_id="watched"))
                for _ in range(WATCHERS)
            ]
            for watch in watches:
                await next_state(watch)

            async def call_until_refused(caller: int) -> None:
                for n in range(100_000):
                    iid = f"c{caller}_{n}"
                    try:
                        await stub.CreateSession(
                            pb.CreateSessionRequest(instance_id=iid), timeout=10
                        )
                    except grpc.aio.AioRpcError as error:
                        outcomes.append(error.code())
                        return
                    created.append(iid)
                    if len(created) >= LOAD:
                        loaded.set()

            callers = [asyncio.create_task(call_until_refused(n)) for n in range(CALLERS)]
            await asyncio.wait_for(loaded.wait(), timeout=30)  # every caller is busy by now
            server.signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*callers), timeout=30)

            endings = []
            for watch in watches:
                try:
                    while True:
                        await next_state(watch)
                except grpc.aio.AioRpcError as error:
                    endings.append(error.code())
            assert endings == [grpc.StatusCode.UNAVAILABLE] * WATCHERS

        assert await asyncio.to_thread(server.wait) == 0
    # Calls were refused only once the server went away, never failed half-way.
    assert set(outcomes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert len(created) >= LOAD  # there really was load
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {row[0] for row in db.execute("SELECT instance_id FROM ll_whatsapp_qr_sessions")}
    assert set(created) <= stored  # every acknowledged create is on disk
